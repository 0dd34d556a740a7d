"""The data floor: everything that reads, decodes and augments images, below training and evaluation.

Imports only `modeling_mopro` (never the training core or `evaluation`), so that every protocol, the noise report
and the trainer read data the same way. One module per concept: `sources` (the one source dispatcher),
`image_folder`, `webvision`, `make_shards` (shards and their writer, `python -m training.data.make_shards`),
`transforms` (decoding, the views, the ImageNet mean/std), `color_jitter`, `collator`, `gpu_augment` and
`noisy_fashion_mnist` (the demo data). Importing the package loads none of them.
"""
