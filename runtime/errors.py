"""The root of kiln's user-facing errors.

It lives in the runtime because the runtime must import nothing from the compile side, while the
compiler may import the runtime: `kiln.errors` re-exports these and adds the compile-time kinds. Catching
`KilnError` catches every refusal kiln explains, whichever side raised it.
"""

from __future__ import annotations


class KilnError(Exception):
    """Base class of kiln's user-facing errors: the message says what is wrong and what to do."""


class ArtifactError(KilnError):
    """A corrupt, mismatched or incomplete artifact, refused with its reason."""


class RankError(KilnError):
    """A rank of a tensor-parallel group failed (runtime/rank_group.py): the engine serves no more requests."""
