"""Flat packing: per-parameter tensors laid out in contiguous flat buffers, one per group.

A ``FlatPacking`` records, for an ordered list of parameters, their names, shapes, dtypes and
devices; it groups them by (device, dtype) and gives each an offset in its group's flat buffer.
Per-parameter tensors (Fisher, anchors) are packed into those buffers in that order, so a fused
kernel walks one buffer per group instead of one small tensor per parameter.

Every offset is a multiple of ``ALIGN`` (16) elements, so each parameter's slice starts on a
16-byte boundary (64 bytes in float32) whatever the dtype: the Triton kernels can then load the
buffers with 16-byte vector loads, which unaligned offsets would forbid (up to 4x the load
instructions). The gaps (at most 15 elements per parameter) hold zeros and belong to no parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence, Union

import torch

from .validation import _names

ALIGN = 16  # elements; see the module docstring
Dtypes = Union[torch.dtype, Sequence[torch.dtype]]


@dataclass(frozen=True)
class Entry:
    """One parameter in a packing. ``offset`` is in elements, within its group's buffer."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    group: int
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Group:
    """Parameters sharing (device, dtype). ``entries`` index into ``FlatPacking.entries``;
    ``numel`` is the length of the group's flat buffer (alignment gaps included)."""

    device: torch.device
    dtype: torch.dtype
    entries: tuple[int, ...]
    numel: int


class FlatPacking:
    """Layout of named tensors in flat per-(device, dtype) buffers.

    Internal to the penalty (the store and the backends share it); not part of the public API and
    not exported from ``fastewc``: a user never builds one to use EWC.

    Groups appear in the order their first member appears; members keep their order within a
    group. ``pack`` builds the buffers, ``unpack``/``views`` give per-parameter views back.
    """

    def __init__(self, specs: Iterable[tuple[str, torch.Size, torch.dtype, torch.device]]):
        keys: dict[tuple[torch.device, torch.dtype], list[tuple[str, torch.Size]]] = {}
        for name, shape, dtype, device in specs:
            keys.setdefault((torch.device(device), dtype), []).append((name, torch.Size(shape)))
        entries: list[Entry] = []
        groups: list[Group] = []
        for g, ((device, dtype), members) in enumerate(keys.items()):
            offset, idx = 0, []
            for name, shape in members:
                offset = -(-offset // ALIGN) * ALIGN
                idx.append(len(entries))
                entries.append(Entry(name, shape, dtype, device, g, offset))
                offset += math.prod(shape)
            groups.append(Group(device, dtype, tuple(idx), offset))
        self.entries: tuple[Entry, ...] = tuple(entries)
        self.groups: tuple[Group, ...] = tuple(groups)
        self.index: dict[str, int] = {e.name: i for i, e in enumerate(entries)}
        if len(self.index) != len(entries):
            dup = [e.name for e in entries if sum(x.name == e.name for x in entries) > 1]
            raise ValueError(f"duplicate names in packing: {_names(sorted(set(dup)))}")

    @classmethod
    def from_tensors(cls, named: Iterable[tuple[str, torch.Tensor]]) -> "FlatPacking":
        """Packing for ``(name, tensor)`` pairs, e.g. a model's ``named_parameters()``."""
        return cls((n, t.shape, t.dtype, t.device) for n, t in named)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    @property
    def numel(self) -> int:
        """Elements of all the packed tensors (alignment gaps not counted)."""
        return sum(e.numel for e in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def entry(self, name: str) -> Entry:
        return self.entries[self.index[name]]

    def _dtypes(self, dtype: "Dtypes") -> list[torch.dtype]:
        if isinstance(dtype, torch.dtype):
            return [dtype] * len(self.groups)
        dtypes = list(dtype)
        if len(dtypes) != len(self.groups):
            raise ValueError(f"{len(dtypes)} dtypes given for {len(self.groups)} groups")
        return dtypes

    def empty(self, dtype: "Dtypes") -> list[torch.Tensor]:
        """Uninitialised flat buffers ``[group.numel]``, one per group, on the group's device;
        ``dtype``: one dtype for all groups, or a sequence with one per group."""
        return [torch.empty(g.numel, dtype=dt, device=g.device) for g, dt in zip(self.groups, self._dtypes(dtype))]

    def empty_with_zero_gaps(self, dtype: "Dtypes") -> list[torch.Tensor]:
        """Flat buffers as in ``empty`` whose alignment gaps (and tails) are zero, the entries'
        slices left for the caller to write: filling whole buffers with zeros first would write
        every byte twice (at 1B parameters, seconds of a registration)."""
        flats = self.empty(dtype)
        for g, flat in zip(self.groups, flats):
            at = 0
            for e in (self.entries[i] for i in g.entries):  # in offset order, as laid out
                if e.offset > at:
                    flat[at:e.offset].zero_()
                at = max(at, e.offset + e.numel)
            if g.numel > at:
                flat[at:].zero_()
        return flats

    def pack(self, tensors: Mapping[str, torch.Tensor], dtype: "Dtypes") -> list[torch.Tensor]:
        """Copy ``tensors[name]`` (any device/dtype, the entry's shape) into new flat buffers
        ``[group.numel]`` (alignment gaps zeroed); ``dtype`` as in ``empty``."""
        flats = self.empty_with_zero_gaps(dtype)
        for e in self.entries:
            t = tensors[e.name]
            if t.shape != e.shape:
                raise ValueError(f"{e.name!r}: shape {tuple(t.shape)} does not match packed shape {tuple(e.shape)}")
            flats[e.group][e.offset : e.offset + e.numel].view(e.shape).copy_(t)
        return flats

    def view(self, flats: Sequence[torch.Tensor], name: str) -> torch.Tensor:
        """The entry's slice of its group buffer, shaped like the parameter (a view, no copy)."""
        e = self.entry(name)
        return flats[e.group][e.offset : e.offset + e.numel].view(e.shape)

    def unpack(self, flats: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{name: view}`` over the flat buffers, in packing order."""
        return {e.name: self.view(flats, e.name) for e in self.entries}

    def same_layout(self, other: "FlatPacking") -> bool:
        """Same names, shapes, dtypes, devices and offsets, in the same order."""
        return self.entries == other.entries
