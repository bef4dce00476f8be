"""SavedModel export for TF Serving (see `mm_ads.export.saved_model`)."""

from mm_ads.export.saved_model import export_saved_model, latest_version, serving_signature_specs, write_archive

__all__ = ["export_saved_model", "latest_version", "serving_signature_specs", "write_archive"]
