"""Named DeepSpeed configs (`engine.ds_config: zero2_bf16` reads `zero2_bf16.json` here), shipped as package data
so that an installed wellread (a wheel, not a checkout) finds them; trainer/assets.py locates them."""
