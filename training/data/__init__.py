"""The data floor, below training and evaluation (it imports only `modeling_mopro`): sources (the dispatchers),
image folders, WebVision, shards, decoding and views (`transforms`), collators, the demo data. Loads no module."""
