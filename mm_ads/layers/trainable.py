"""`set_sublayers_trainable`: a layer's `trainable` for the sublayers it creates after `trainable` was set."""


def set_sublayers_trainable(layer, sublayers):
    """Gives `sublayers`, just created by `layer`, the `trainable` of `layer`.

    Keras 3 passes `layer.trainable = value` on only to the sublayers (and their variables) that exist when it
    is set. A `trainable=False` given to the constructor is set before any sublayer exists, and so is one set
    before `build` on a layer that creates its sublayers in `build`: a layer calls this right after creating
    sublayers, so that a frozen layer's sublayers are frozen too (recursively: each sublayer passes it on to
    the sublayers it has, and those that create theirs later call this then). Setting `trainable` afterwards
    reaches every existing sublayer through Keras itself.

    Sublayers are assigned explicitly, one by one, because Keras skips assigning an attribute the object it
    already holds: `layer.trainable = layer.trainable` does nothing.

    Args:
        layer: a Keras layer.
        sublayers: the sublayers `layer` has just created (None entries are skipped).
    """
    for sublayer in sublayers:
        if sublayer is not None:
            sublayer.trainable = layer.trainable
