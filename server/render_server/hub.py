"""Files from the Hugging Face hub, asked for once at start-up.

transformers retries an unreachable hub with backoff for close to a minute per
file, logging every attempt. The server asks the hub once, with a short timeout
and no retries, before it loads a hub source: an unreachable hub then costs a
few seconds, and the files are taken from the cache if they are there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import huggingface_hub
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

from .config import ConfigError, Source

log = logging.getLogger(__name__)

# Seconds to wait for the hub's answer about a model before calling it unreachable.
HUB_TIMEOUT = 10.0


def from_hub_or_cache(load: Callable[..., Any], source: Source, where: str) -> Any:
    """`load(hub id, revision=..., local_files_only=...)`: from the hub, or from the cache when it is unreachable.

    Raises ConfigError, one line, when the hub answers that the model or revision
    does not exist or may not be read, or is unreachable and the cache lacks the files.
    """
    assert source.hub is not None
    unreachable = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _unreachable(source, where)
    if unreachable is None:
        return load(source.hub, revision=source.revision)
    try:
        loaded = load(source.hub, revision=source.revision, local_files_only=True)
    except OSError:
        raise ConfigError(
            f"{where}: {source.describe()}: not in the local cache ({constants.HF_HUB_CACHE}) "
            f"and the hub is unreachable ({unreachable})"
        ) from None
    log.warning(
        "%s: %s: loaded from the local cache: the hub is unreachable (%s)", where, source.describe(), unreachable
    )
    return loaded


def _unreachable(source: Source, where: str) -> str | None:
    """Why the hub cannot be asked for `source`, or None if it answered."""
    assert source.hub is not None
    try:
        huggingface_hub.HfApi().model_info(source.hub, revision=source.revision, timeout=HUB_TIMEOUT)
    except RevisionNotFoundError:
        raise ConfigError(f"{where}: {source.describe()}: no revision {source.revision!r} on the hub") from None
    except GatedRepoError:
        raise ConfigError(f"{where}: {source.describe()}: a gated model: set HF_TOKEN to a token with access") from None
    except RepositoryNotFoundError:
        raise ConfigError(
            f"{where}: {source.describe()}: no such model on the hub (or private: set HF_TOKEN)"
        ) from None
    except Exception as exc:  # no route, DNS, TLS, timeout, 5xx: the cache may still have the files
        return one_line(exc)
    return None


def one_line(exc: BaseException) -> str:
    """`exc` as one line: its type and the first line of its message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
