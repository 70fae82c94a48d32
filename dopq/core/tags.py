"""Image tags for job images: ``dopq/<user>/<name>:<job-id>``, valid for Docker whatever
the user and job are called."""

from __future__ import annotations

import re
import unicodedata

from dopq.core.errors import JobRejected
from dopq.core.fields import show

_TAG_BAD = re.compile(r"[^a-z0-9._-]+")
_TAG_SEPS = re.compile(r"[._-]{2,}")


def normalise_tag(user: str, name: str, job_id: int) -> str:
    """The image reference ``dopq/<user>/<name>:<job-id>``, valid for Docker.

    Each component is lower-cased, folded to ASCII, reduced to ``[a-z0-9._-]``
    with separator runs collapsed, starts and ends with a letter or digit, and
    is capped in length; the job id keeps tags of same-named jobs apart.
    """
    if isinstance(job_id, bool) or not isinstance(job_id, int) or not 0 <= job_id < 2**63:
        raise JobRejected(f"image tag: bad job id {show(job_id)}")
    if not isinstance(user, str) or not isinstance(name, str):
        raise JobRejected("image tag: user and name must be strings")
    return f"dopq/{_component(user, 'user', 32)}/{_component(name, 'job', 64)}:{job_id}"


def _component(text: str, fallback: str, cap: int) -> str:
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    comp = _TAG_BAD.sub("-", folded)
    # Docker allows one '.', one or two '_', or any number of '-' between parts.
    comp = _TAG_SEPS.sub(lambda m: "-" if "-" in m.group() or "." in m.group() else "__", comp)
    comp = comp.strip("._-")[:cap].rstrip("._-")
    return comp or fallback
