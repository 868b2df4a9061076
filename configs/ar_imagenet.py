"""The official DetailFlow AR recipe on ImageNet-1k (spec §2, §3.4): GPT-L, ten-crop codes, 300 epochs.

    python -m detailflow_jax.tokenizer.extract --config configs/ar_imagenet.py:N=128 --tokenizer /ckpt/df16 \
        --tokenizer_config configs/tokenizer.py:DF-16 --out /data/codes/df16 --config.extract.data.data_dir=/data/tfds
    python -m detailflow_jax.train.ar --config configs/ar_imagenet.py:N=128 --workdir /ckpt/ar_df16 \
        --config.codes_dir=/data/codes/df16 --config.mesh.fsdp=8

Argument keys: N (128 / 256 / 512 = DetailFlow-16 / 32 / 64), gpt (the configs/gpt.py variant name, default L),
batch (global batch; the yaml's 256, the README recommends 512 for N = 128 / 256).
"""

import ml_collections

from configs import common
from configs import gpt as gpt_configs
from detailflow_jax import config_lib
from detailflow_jax.data.pipeline import default_data_config


def ar_training(gpt: ml_collections.ConfigDict, extract_data: ml_collections.ConfigDict,
                views: str) -> ml_collections.ConfigDict:
    """Every field of an AR recipe; the values are the official ImageNet ones (spec §3.4)."""
    c = ml_collections.ConfigDict()
    c.model = gpt.model                # GPTConfig fields; N, g, C, vocab and classes must match the codes
    c.sampling = gpt.sampling          # cfg_scale, temperature, top_k, top_p, ... for the sample grids
    c.codes_dir = ""                   # written by python -m detailflow_jax.tokenizer.extract
    c.tokenizer = ""                   # for sample grids; "" = the tokenizer recorded in the codes' metadata
    c.tokenizer_config = ""            # FILE.py:ARG when `tokenizer` is a converted parameter directory
    c.extract = ml_collections.ConfigDict(dict(
        data=extract_data, split="train",
        views=views,                   # center (1) | center_flip (2) | ten_crop (10, official)
        batch_size=256,                # images per tokenizer pass on each process
        chunk_size=10_000,             # images per committed chunk file (the unit of resumption)
        seed=0,                        # noise spans and noisy codes come from (seed, image index)
        dtype="",                      # tokenizer compute dtype; "" = its config's (the official run used bf16)
    ))
    c.seed = 0
    c.batch_size = 256                 # global
    c.epochs = 300
    c.total_steps = 0                  # 0: epochs x (images // batch_size)
    c.grad_accum = 1                   # micro-batches per step (same result in expectation, less memory)
    c.mesh = common.mesh_config()
    c.correction_prob = 0.3
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-4, b1=0.9, b2=0.95, weight_decay=0.05, warmup_fraction=0.05, clip_norm=1.0))
    c.ema_decay = 0.9999
    c.data_threads = 8                 # grain read threads per process
    c.log_every = 50
    c.checkpoint_every = 10_008        # 2 epochs at batch 256
    c.keep_checkpoints = 10
    c.sample_every = 10_008            # class-conditional PNG grids (EMA weights) when the tokenizer is available
    c.sample_classes = ()              # () = every class (at most 16 are shown); else the class ids for the rows
    c.samples_per_class = 8
    c.sample_seed = 0
    return c


def get_config(arg: str | None = None):
    arg = config_lib.parse_arg(arg, N=128, gpt="L", batch=256)
    config_lib.require(arg.N in (128, 256, 512), "N", arg.N, "the released tokenizers have N = 128, 256 or 512")
    gpt = gpt_configs.get_config(f"{arg.gpt}/{arg.N},dtype=bfloat16")
    data = default_data_config(name="imagefolder", image_size=256, eval_crop="ten_crop")
    c = ar_training(gpt, data, views="ten_crop")
    c.batch_size = arg.batch
    c.checkpoint_every = c.sample_every = 2 * (1_281_167 // arg.batch)
    c.sample_classes = (207, 360, 387, 974, 88, 979, 417, 279)  # the LlamaGen demo classes
    c.samples_per_class = 4
    return c
