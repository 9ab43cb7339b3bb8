"""AlexNet as in Krizhevsky et al. (2012), trained on alexpipe shards.

- ``model``: the paper's network (two columns as grouped convolutions).
- ``columns``: the same network split over two devices (model parallelism).
- ``config``: :class:`TrainConfig`, the frozen settings of a run.
- ``data``: the one call into :mod:`pipeline.load.loader`.
- ``engine``: ``train_one_epoch``, ``evaluate``, ``fit``.
- ``session`` / ``checkpoint``: the run's state and RUN/checkpoint.pt.
- ``schedule``: torch's learning-rate schedulers, as the run uses them;
  ``metrics``: metrics.jsonl, curves.png.
- ``health``: stops a run that can no longer learn (divergence), in one line.
- ``distributed``: process groups (torchrun, local spawning, one process).
- ``run``: a whole run (``train``); ``evaluation``: ``evaluate_checkpoint``.

Heavy imports (torch) happen in the submodules, not here.
"""
