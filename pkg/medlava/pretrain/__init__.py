"""The `pretrain` stage: CLIP-style contrastive image-text pretraining with open_clip (BiomedCLIP / PMC-CLIP
style) on the prepared samples, evaluated by image-text retrieval and zero-shot classification; its vision
encoder can become a LLaVA vision tower (`model.vision_tower`, medlava.models.vision_tower)."""
