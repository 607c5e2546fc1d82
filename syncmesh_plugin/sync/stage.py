"""What every stage of a volume's sync work starts from: the volume object whose state they share."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..meta import EtcdStore

if TYPE_CHECKING:
    from .volume import VolumeSync


class Stage:
    """One step of a volume's work. Shared state (dirty paths, deferred changes, the lock, the guard)
    lives on the volume object; each stage keeps only its own, and calls the others through it."""

    def __init__(self, vol: VolumeSync) -> None:
        self.vol = vol
        self.ctx = vol.ctx
        self.state = vol.state
        self.name = vol.name
        self.root = vol.root

    @property
    def store(self) -> EtcdStore:
        return self.vol.store
