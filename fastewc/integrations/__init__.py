"""Integrations with training frameworks. Each submodule imports its framework lazily and says
which extra to install when it is missing:

* :mod:`fastewc.integrations.transformers`: Hugging Face ``Trainer`` (extra ``hf``);
* :mod:`fastewc.integrations.lightning`: a Lightning ``Callback`` (extra ``lightning``).
"""
