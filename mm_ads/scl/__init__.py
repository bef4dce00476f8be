"""Semantic-aware contrastive learning (SCL, paper §3 and §6.1–6.2): item encoders for text and images.

Modules (one concern each):
  text_tower   word tokenizer built from the training pairs (OOV → hash buckets) + small transformer
  image_tower  small pre-activation residual net with GroupNorm, trained from scratch
  pretrained_tower  MiniLM text tower (a pretrained BERT through keras-hub)
  pretrained_image_tower  EfficientNet-Lite0 image tower (ImageNet weights of a torch state dict)
  torch_weights  torch state dict files → numpy arrays, without torch (restricted unpickler)
  projection   projection head → L2-normalised D-dim vectors
  losses       InfoNCE (learnable clamped τ, false negatives masked by item id) and triplet
  queue        MoCo ring-buffer queue of keys + item ids (any K, any batch; identical on every replica)
  momentum     cross-replica-consistent updates (MoCo key encoder, τ clamp)
  model        SCLModel: encoder + key encoder + queue + temperature
  augment      seeded image decoding / augmentation
  task         SCLTask for the one Trainer; Acc@N evaluation
  clip         CLIP-E: item image ↔ title alignment (`CrossModalTask`, the `clip` task)
  export       encoder SavedModel (raw text / image bytes → vectors)
  encode       catalogue → item → vector table (`python -m mm_ads.encode`)
"""
