"""Evaluation protocols of MoPro (one module per protocol, each also a script: `python -m evaluation.<name>`).

- `classification`: top-1 / top-5 on WebVision val and ImageNet val.
- `lowshot_svm`: linear SVMs on frozen features, VOC07 (mAP) and Places205 (accuracy), k images per class.
- `finetune`: ImageNet 1% / 10% fine-tuning with the transformers Trainer.
- `robustness`: ImageNet-R / ImageNet-A accuracy and calibration (RMS, ECE) on their 200 classes.
- `knn`: weighted k-nearest-neighbour accuracy on the embeddings.
- `classifier_retrain`: classifier retraining (cRT) on the cleaned labels with a class-balanced sampler.
- `noise_report`: per-sample noise decisions (clean / relabelled / OOD) of a trained model, `pseudo_label.json`;
  `gallery` adds the flagged samples' images (a `datasets.Image` configuration and an offline `index.html`).
- `training_curves`: `training_curves.png` of a run from its `trainer_state.json`.

Each protocol writes `eval_<protocol>[_<dataset>].json` (metric name -> number, plus "dataset_name", "dataset_type"
and "task") into the evaluated model's folder; the release step turns those files into the model card.
"""
