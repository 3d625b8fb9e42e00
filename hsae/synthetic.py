"""Synthetic sparse activations with a known ground-truth dictionary and domain labels.

Used by tests and quick checks: x = sum of a few unit-norm dictionary atoms with random magnitudes
(``sparse_dictionary_data``), or of atoms that fire in planted groups (``grouped_dictionary_data``).
Half of the atoms are shared by both domains, the rest belong to one domain each, so a domain label
is recoverable from which atoms fire (what InfoNCE on domain labels can exploit).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SyntheticData:
    x: np.ndarray  # (N, d) float32
    labels: np.ndarray  # (N,) int64, 0 = retain, 1 = forget
    dictionary: np.ndarray  # (m, d) unit rows
    atom_domain: np.ndarray  # (m,) -1 shared, else the domain that owns the atom


def sparse_dictionary_data(
    n_tokens: int,
    d: int = 32,
    n_atoms: int = 128,
    p_active: float = 0.04,
    shared_fraction: float = 0.5,
    noise: float = 0.01,
    seed: int = 0,
) -> SyntheticData:
    rng = np.random.default_rng(seed)
    dictionary = rng.standard_normal((n_atoms, d))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    n_shared = int(round(shared_fraction * n_atoms))
    atom_domain = np.full(n_atoms, -1, dtype=np.int64)
    atom_domain[n_shared:] = np.arange(n_atoms - n_shared) % 2
    labels = rng.integers(0, 2, size=n_tokens)
    usable = (atom_domain[None, :] == -1) | (atom_domain[None, :] == labels[:, None])
    active = (rng.random((n_tokens, n_atoms)) < p_active) & usable
    codes = active * rng.uniform(0.5, 1.5, size=(n_tokens, n_atoms))
    x = codes @ dictionary + noise * rng.standard_normal((n_tokens, d))
    return SyntheticData(x.astype(np.float32), labels.astype(np.int64), dictionary.astype(np.float32), atom_domain)


@dataclass
class GroupedData:
    x: np.ndarray  # (N, d) float32
    labels: np.ndarray  # (N,) int64, 0 = retain, 1 = forget
    dictionary: np.ndarray  # (m, d) unit rows
    atom_group: np.ndarray  # (m,) the planted group of each atom
    group_domain: np.ndarray  # (G,) -1 shared by both domains, else the domain that owns the group


def grouped_dictionary_data(
    n_tokens: int,
    d: int = 32,
    n_groups: int = 8,
    atoms_per_group: int = 16,
    groups_per_token: int = 2,
    p_atom: float = 0.25,
    noise: float = 0.01,
    seed: int = 0,
) -> GroupedData:
    """Atoms in planted groups that fire together: each token picks ``groups_per_token`` of the groups its
    domain may use, then each atom of a picked group fires with ``p_atom``. Half the groups are shared by
    both domains, the others belong to one domain each, so co-activation reveals the groups and group
    activity reveals the domain."""
    rng = np.random.default_rng(seed)
    m = n_groups * atoms_per_group
    dictionary = rng.standard_normal((m, d))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    atom_group = np.repeat(np.arange(n_groups), atoms_per_group)
    group_domain = np.full(n_groups, -1, dtype=np.int64)
    group_domain[n_groups // 2:] = np.arange(n_groups - n_groups // 2) % 2
    labels = rng.integers(0, 2, size=n_tokens)
    usable = (group_domain[None, :] == -1) | (group_domain[None, :] == labels[:, None])
    scores = np.where(usable, rng.random((n_tokens, n_groups)), -1.0)
    picked = np.zeros((n_tokens, n_groups), dtype=bool)
    np.put_along_axis(picked, np.argsort(-scores, axis=1)[:, :groups_per_token], True, axis=1)
    active = picked[:, atom_group] & (rng.random((n_tokens, m)) < p_atom)
    codes = active * rng.uniform(0.5, 1.5, size=(n_tokens, m))
    x = codes @ dictionary + noise * rng.standard_normal((n_tokens, d))
    return GroupedData(x.astype(np.float32), labels.astype(np.int64), dictionary.astype(np.float32), atom_group,
                       group_domain)
