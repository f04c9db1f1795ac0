"""Models from the Hugging Face hub: what a source string may be, and whether it can be loaded here.

The course never needs the hub (every lesson has an embedded default, ``"zoo"``); a learner with
internet may name a hub model instead. This module imports nothing heavy, so the runner can refuse
a source that cannot work before it starts a lesson.
"""
from __future__ import annotations

import re
from pathlib import Path

# A hub id: "name" or "owner/name" (letters, digits, '-', '_', '.'), e.g. "facebook/opt-125m".
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class SourceUnavailable(RuntimeError):
    """A hub model that is neither in the local cache nor reachable: it needs internet once."""


def is_saved_model(source: str) -> bool:
    """A local folder holding a saved Hugging Face model (its ``config.json``)."""
    return (Path(source).expanduser() / "config.json").is_file()


def well_formed(source: object) -> bool:
    """"zoo", a folder holding a saved model, or a string shaped like a hub id."""
    return isinstance(source, str) and (source == "zoo" or is_saved_model(source) or HUB_ID.fullmatch(source) is not None)


def check_source(source: str) -> None:
    """Refuse, at once and before any slow work, a model source that cannot be loaded here.

    Accepted: "zoo" (the embedded checkpoint, never the network); a local folder holding a saved
    Hugging Face model; a hub id such as "facebook/opt-125m" that is in the local Hugging Face
    cache or, when the hub can be reached, on the hub. Offline (``HF_HUB_OFFLINE=1``) an uncached
    id fails without trying the network; otherwise one metadata request (10 s timeout) decides.

    Raises:
        ValueError: a source of no accepted form, or a hub id the hub does not have.
        SourceUnavailable: a hub id that is not cached while the hub cannot be reached.
    """
    if not well_formed(source):
        raise ValueError(f"source must be 'zoo', a folder holding a saved model, or a hub id such as "
                         f"'facebook/opt-125m'; got {source!r}")
    if source == "zoo" or is_saved_model(source):
        return
    import huggingface_hub
    from huggingface_hub import constants

    if isinstance(huggingface_hub.try_to_load_from_cache(source, "config.json"), str):
        return
    advice = (f"{source!r} is not in the local Hugging Face cache, and {{why}}. A hub model needs internet once "
              f"(or a copy in the cache, see HF_HOME); without one, use the embedded model: source='zoo' "
              f"(lm_source = \"zoo\", the lessons' default).")
    if constants.HF_HUB_OFFLINE:
        raise SourceUnavailable(advice.format(why="HF_HUB_OFFLINE is set"))
    try:
        huggingface_hub.model_info(source, timeout=10)
    except huggingface_hub.errors.RepositoryNotFoundError:
        raise ValueError(f"the hub has no model {source!r} (or it is private): check the id, e.g. 'facebook/opt-125m'") from None
    except Exception as err:  # no network, DNS, proxy, timeout
        raise SourceUnavailable(advice.format(why=f"the hub cannot be reached ({type(err).__name__})")) from None
