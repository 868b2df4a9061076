r"""The official DetailFlow tokenizer recipe on ImageNet-1k (docs/recipes.md).

    python -m detailflow_jax.data.imagefolder --root /data/imagenet --data_dir /data/tfds   # once, offline
    python -m detailflow_jax.train.tokenizer --config configs/tokenizer_imagenet.py:DF-16 --workdir gs://.../df16 \
        --config.data.data_dir=/data/tfds --config.losses.lpips_weights=/w/lpips --config.losses.dino_weights=/w/dino \
        --config.losses.siglip_weights=/w/siglip2 --config.encoder_weights=/w/siglip2
        # /w/siglip2: python -m detailflow_jax.convert.siglip2 --checkpoint .../model.safetensors --out /w/siglip2

Argument: DF-16 | DF-32 | DF-64 (N = 128 / 256 / 512), optionally followed by configs/tokenizer.py
arguments, e.g. "DF-32,dtype=bfloat16". Batch 256, Adam(0.9, 0.95) lr 1e-4 x batch / 256 with a
1-epoch warm-up and cosine to 0.1 x that, 250 epochs (the trainer resolves the steps for the dataset
and the batch), MSE + LPIPS (10k warm-up) + 0.2 hinge GAN with the DINO discriminator from step 40k
+ LeCAM + CR + the alignment of token 1 with a frozen SigLIP2 (weight 1); the encoder starts from
the first 12 layers of the same SigLIP2 tower (encoder_pretrained; --config.encoder_pretrained=False
trains it from random weights).
"""  # noqa: E501

from configs import common
from configs import tokenizer as tokenizer_configs
from detailflow_jax.data.pipeline import default_data_config


def get_config(arg: str = "DF-16"):
    model = tokenizer_configs.get_config(arg or "DF-16").model
    if model.dtype == "float32":
        model.dtype = "bfloat16"  # official: bf16 autocast with fp32 weights
    data = default_data_config(name="imagefolder", image_size=model.image_size)
    config = common.tokenizer_training(model, data)
    # official: the first 12 so400m layers; needs --config.encoder_weights
    config.encoder_pretrained = True
    return config
