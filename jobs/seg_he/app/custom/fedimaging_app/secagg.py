"""Pairwise-masking secure aggregation after Bonawitz et al., CCS 2017 (numpy, ``cryptography``, PyCryptodome).

One round, for a roster of at least 3 sites and threshold t = floor(|roster| / 2) + 1:

1. Keys. Each site makes two fresh X25519 key pairs for the round: ``c`` (to encrypt secret shares to
   other sites) and ``s`` (to agree pairwise mask seeds), plus a random 16-byte self-mask seed ``b``.
   It sends only the public keys; the server relays them to every site. The roster is the sites
   whose keys arrived.
2. Shares. Each site splits its ``s`` private key and ``b`` into |roster| Shamir shares with threshold
   t (PyCryptodome's ``Shamir`` over GF(2^128)) and encrypts share j for site j with AES-GCM under a
   key derived from the ``c`` key agreement. The server keeps the ciphertexts, which it cannot read.
   The participants are the roster sites whose shares arrived.
3. Masked update. Each participant encodes its weighted update (w_u / W) * (theta_u - theta_global)
   as 32-bit fixed point, adds the ChaCha20 stream of its self seed and, for every other participant
   v, adds (u < v) or subtracts (u > v) the ChaCha20 stream of the pairwise seed agreed with v.
   Pairwise streams cancel in the sum; the server sees only uniformly random vectors.
4. Unmask. The server names the survivors U (masked updates received) and the dropped participants
   D, and hands each survivor the shares addressed to it. Each survivor reveals, for every site of U,
   its share of that site's self seed and, for every site of D, its share of that site's ``s``
   private key, never both for one site. With t shares the server removes the self masks of U and the
   pairwise masks between D and U, and obtains the weighted sum of the survivors' updates, nothing
   else. Fewer than t survivors fail the round.

``fedimaging_app.secure_workflow`` runs steps 1 and 2 of the next round alongside steps 3 and 4 of the
current one, so that a round costs one NVFlare task more than plain FedAvg.

The server never holds a surviving site's private key or pairwise seed; it reconstructs the per-round
mask key of a site that dropped after sending its shares, whose update is not in the aggregate. Key
pairs and seeds are fresh every round. Threat model: the server and sites follow the protocol but
may be curious (honest-but-curious), as in the paper's semi-honest setting.

Fixed point: values are multiplied by 2^20 and reduced modulo 2^32, read back as signed 32-bit
integers; the weighted sum must lie in (-2048, 2048), so each site refuses an update with a
coordinate of magnitude 2048 or more (weights sum to at most 1). Rounding error is at most
2^-21 per site and coordinate. Updates are the same size as float32 plaintext (4 bytes per value).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

FRACTION_BITS = 20
SCALE = float(2**FRACTION_BITS)
LIMIT = 2.0 ** (31 - FRACTION_BITS)  # the weighted sum must stay in (-LIMIT, LIMIT)
SEED_BYTES = 16  # Shamir over GF(2^128) shares 16-byte secrets
_NONCE = bytes(16)  # every ChaCha20 key is used for one stream only
CHUNK = 1 << 18  # values per block when encoding and masking (2 MB of reused float64 scratch per buffer)


class SecAggError(RuntimeError):
    """The protocol cannot go on safely (too few sites, a bad message); the round must fail."""


def threshold_for(n_sites: int) -> int:
    """Shares needed to reconstruct a secret: a majority of the round's participants."""
    return n_sites // 2 + 1


def site_order(sites) -> list[str]:
    """Canonical order of sites; a site's Shamir index is its position in it plus one."""
    return sorted(sites)


def as_numpy(value) -> np.ndarray:
    """Return a tensor or array as a numpy array, moving tensors to the CPU first."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def model_layout(params: dict) -> list[list]:
    """Names and shapes of a parameter dict in sorted name order: the order updates are flattened in."""
    return [[name.removeprefix("module."), list(np.shape(as_numpy(params[name])))] for name in sorted(params)]


def flatten_update(trained: dict, reference: dict) -> np.ndarray:
    """``trained - reference`` over the reference's parameters, flattened in ``model_layout`` order (float64)."""
    parts = [as_numpy(trained[name]).astype(np.float64).reshape(-1) - as_numpy(reference[name]).astype(np.float64).reshape(-1)
             for name in sorted(reference)]
    return np.concatenate(parts) if parts else np.zeros(0)


# ----------------------------------------------------------------------------------------- primitives
def _hkdf(material: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(material)


def add_stream(target: np.ndarray, key: bytes, subtract: bool = False) -> None:
    """Add (or, with ``subtract``, take away) the ChaCha20 key stream of ``key`` to ``target`` in place.

    ``target`` is a flat uint32 array; arithmetic is modulo 2^32. The stream is made and applied in
    blocks of ``CHUNK`` words, so no stream-sized array is ever allocated.
    """
    encryptor = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()
    zeros = memoryview(bytes(4 * CHUNK))
    block = bytearray(4 * CHUNK + 64)  # update_into wants room beyond the input length
    words = np.frombuffer(block, dtype="<u4", count=CHUNK)
    apply = np.subtract if subtract else np.add
    for start in range(0, target.size, CHUNK):
        count = min(CHUNK, target.size - start)
        encryptor.update_into(zeros[:4 * count], block)
        part = target[start:start + count]
        apply(part, words[:count], out=part)


def stream_uint32(key: bytes, length: int) -> np.ndarray:
    """``length`` pseudo-random 32-bit words: the ChaCha20 key stream of ``key`` (32 bytes)."""
    words = np.zeros(length, dtype=np.uint32)
    add_stream(words, key)
    return words


def public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def private_bytes(private: X25519PrivateKey) -> bytes:
    return private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def pair_seed(private: X25519PrivateKey, peer_public: bytes, context: str, a: str, b: str) -> bytes:
    """Derive the mask seed two sites agree for a round; both sides derive the same seed."""
    low, high = sorted((a, b))
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return _hkdf(shared, f"fedimaging-secagg mask|{context}|{low}|{high}".encode())


def self_mask_key(seed: bytes, context: str) -> bytes:
    return _hkdf(seed, f"fedimaging-secagg self|{context}".encode())


def _share_key(private: X25519PrivateKey, peer_public: bytes, context: str, sender: str, recipient: str) -> bytes:
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    low, high = sorted((sender, recipient))
    return _hkdf(shared, f"fedimaging-secagg shares|{context}|{low}|{high}".encode())


def split_secret(secret: bytes, threshold: int, n: int) -> list[list[tuple[int, bytes]]]:
    """Shamir shares of ``secret`` (a multiple of 16 bytes), one 16-byte share per chunk, indices 1..n."""
    from Crypto.Protocol.SecretSharing import Shamir

    if len(secret) % SEED_BYTES:
        raise ValueError("secret length must be a multiple of 16 bytes")
    per_chunk = [Shamir.split(threshold, n, secret[i:i + SEED_BYTES]) for i in range(0, len(secret), SEED_BYTES)]
    return [[chunk[j] for chunk in per_chunk] for j in range(n)]  # shares[j] = [(index, bytes) per chunk]


def combine_secret(shares: list[list[tuple[int, bytes]]]) -> bytes:
    """Rebuild a secret from at least ``threshold`` share lists (as made by ``split_secret``)."""
    from Crypto.Protocol.SecretSharing import Shamir

    chunks = len(shares[0])
    return b"".join(Shamir.combine([s[c] for s in shares]) for c in range(chunks))


def _encode_into(out: np.ndarray, start: int, new: np.ndarray, old: np.ndarray | None, scale: float,
                 name: str, scratch: np.ndarray, spare: np.ndarray) -> None:
    """Write ``rint(scale * (new - old))`` as ring elements to ``out[start:]``, checking every block first.

    Works in blocks of ``CHUNK`` values in float64 scratch space, so no update-sized float64 copy is
    made. Raises ``SecAggError`` for a NaN, an infinity or a value of magnitude ``LIMIT`` or more.
    """
    for offset in range(0, new.size, CHUNK):
        count = min(CHUNK, new.size - offset)
        values = scratch[:count]
        if old is None:
            np.copyto(values, new[offset:offset + count])
        else:
            np.subtract(new[offset:offset + count], old[offset:offset + count], out=values, dtype=np.float64)
        peak = float(np.max(np.abs(values, out=spare[:count])))
        if not np.isfinite(peak):
            raise SecAggError(f"the update of {name} contains NaN or infinite values; it was not masked or sent")
        if peak >= LIMIT:
            raise SecAggError(f"an update value of magnitude {peak:.4g} in {name} does not fit the fixed-point range "
                              f"(below {LIMIT:g}); set aggregation.max_update_norm in the job to bound updates")
        np.multiply(values, scale, out=values)
        np.rint(values, out=values)
        # Every value is below 2^31 in magnitude: the int32 bits are the ring element.
        np.copyto(out[start + offset:start + offset + count].view(np.int32), values, casting="unsafe")


def _check_fraction(fraction: float) -> None:
    if not 0.0 < fraction <= 1.0:
        raise SecAggError(f"weight fraction {fraction} is not in (0, 1]")


def encode(values: np.ndarray, fraction: float) -> np.ndarray:
    """Fixed-point encoding of ``fraction * values`` (a flat array) in the 32-bit ring.

    Raises ``SecAggError`` when a value is not finite or ``|values| >= LIMIT`` (weights sum to at most
    1, so the weighted sum then stays in range) or ``fraction`` is not in (0, 1].
    """
    _check_fraction(fraction)
    values = np.asarray(values).reshape(-1)
    out = np.empty(values.size, dtype=np.uint32)
    _encode_into(out, 0, values, None, fraction * SCALE, "the update", np.empty(CHUNK), np.empty(CHUNK))
    return out


def encode_update(trained: dict, reference: dict, fraction: float) -> np.ndarray:
    """``encode(flatten_update(trained, reference), fraction)`` without the float64 copies of the model."""
    _check_fraction(fraction)
    names = sorted(reference)
    sizes = [as_numpy(reference[name]).size for name in names]
    out = np.empty(sum(sizes), dtype=np.uint32)
    scratch, spare, start = np.empty(CHUNK), np.empty(CHUNK), 0
    for name, size in zip(names, sizes):
        new, old = as_numpy(trained[name]).reshape(-1), as_numpy(reference[name]).reshape(-1)
        if new.size != size:
            raise SecAggError(f"the trained {name} has {new.size} values, the global model's {size}")
        _encode_into(out, start, new, old, fraction * SCALE, name.removeprefix("module."), scratch, spare)
        start += size
    return out


def decode(ring: np.ndarray) -> np.ndarray:
    """Signed reading of ring elements, back to floating point."""
    signed = np.asarray(ring, dtype=np.uint32).view(np.int32)
    return np.multiply(signed, 1.0 / SCALE, dtype=np.float64)


# ----------------------------------------------------------------------------------------- site side
@dataclass
class SiteRound:
    """One site's secrets and state for one round; never leaves the site.

    ``roster``: the sites whose keys the server relayed for the round (Shamir indices and threshold
    come from it); ``participants``: the roster sites whose shares reached the server in time, the
    sites this one masks with.
    """

    site: str
    context: str
    c_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    s_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    self_seed: bytes = field(default_factory=lambda: os.urandom(SEED_BYTES))
    roster: list[str] = field(default_factory=list)
    participants: list[str] = field(default_factory=list)
    public_keys: dict = field(default_factory=dict)
    threshold: int = 0
    held_shares: dict = field(default_factory=dict)  # sender -> {"s": [...], "b": [...]}
    masked: bool = False
    revealed: bool = False

    def advertise(self) -> dict:
        return {"c_pk": public_bytes(self.c_key).hex(), "s_pk": public_bytes(self.s_key).hex()}

    def make_shares(self, public_keys: dict[str, dict]) -> dict[str, str]:
        """Encrypted Shamir shares of this site's ``s`` key and self seed, one per roster site (hex)."""
        if self.site not in public_keys:
            raise SecAggError(f"the server's key list for this round omits this site ({self.site})")
        if public_keys[self.site] != self.advertise():
            raise SecAggError("the server relayed other public keys for this site than the ones it advertised")
        if len(public_keys) < 3:
            raise SecAggError(f"secure aggregation needs at least 3 sites in a round; the server listed {len(public_keys)}")
        self.public_keys = {k: {"c_pk": bytes.fromhex(v["c_pk"]), "s_pk": bytes.fromhex(v["s_pk"])}
                            for k, v in public_keys.items()}
        self.roster = site_order(public_keys)
        n = len(self.roster)
        self.threshold = threshold_for(n)
        s_shares = split_secret(private_bytes(self.s_key), self.threshold, n)
        b_shares = split_secret(self.self_seed, self.threshold, n)
        out = {}
        for j, recipient in enumerate(self.roster):
            payload = _pack({"s": s_shares[j], "b": b_shares[j]})
            if recipient == self.site:
                self.held_shares[self.site] = _unpack(payload)
                continue
            key = _share_key(self.c_key, self.public_keys[recipient]["c_pk"], self.context, self.site, recipient)
            nonce = os.urandom(12)
            aad = f"{self.context}|{self.site}|{recipient}".encode()
            out[recipient] = (nonce + AESGCM(key).encrypt(nonce, payload, aad)).hex()
        return out

    def set_participants(self, participants: list[str]) -> None:
        """Fix the sites this one masks with: roster sites whose shares the server holds."""
        if not self.roster:
            raise SecAggError("this site has not shared its keys for the round")
        if self.site not in participants or not set(participants) <= set(self.roster):
            raise SecAggError("the server's participant list is not a part of the round's roster with this site in it")
        if len(participants) < 3:
            raise SecAggError("the round has fewer than 3 participants; masking would not hide an update")
        self.participants = site_order(participants)

    def receive_shares(self, encrypted: dict[str, str]) -> None:
        """Decrypt the shares the round's participants addressed to this site."""
        missing = [s for s in self.participants if s != self.site and s not in encrypted]
        if missing:
            raise SecAggError(f"no secret shares reached {self.site} from {missing}")
        for sender in self.participants:
            if sender == self.site or sender in self.held_shares:
                continue
            blob = bytes.fromhex(encrypted[sender])
            key = _share_key(self.c_key, self.public_keys[sender]["c_pk"], self.context, sender, self.site)
            aad = f"{self.context}|{sender}|{self.site}".encode()
            try:
                self.held_shares[sender] = _unpack(AESGCM(key).decrypt(blob[:12], blob[12:], aad))
            except Exception as exc:  # InvalidTag: tampered or misaddressed
                raise SecAggError(f"the secret shares from {sender} failed authentication at {self.site}") from exc

    def mask(self, update: np.ndarray, fraction: float) -> np.ndarray:
        """Encode ``fraction * update`` (a flat array) and add this site's masks; the result is safe to send."""
        self._ready_to_mask()
        return self._add_masks(encode(update, fraction))

    def mask_update(self, trained: dict, reference: dict, fraction: float) -> np.ndarray:
        """``mask(flatten_update(trained, reference), fraction)``, without float64 copies of the model."""
        self._ready_to_mask()
        return self._add_masks(encode_update(trained, reference, fraction))

    def _ready_to_mask(self) -> None:
        if len(self.participants) < 3:
            raise SecAggError("the round has fewer than 3 participants; masking would not hide an update")

    def _add_masks(self, masked: np.ndarray) -> np.ndarray:
        add_stream(masked, self_mask_key(self.self_seed, self.context))
        for peer in self.participants:
            if peer != self.site:
                seed = pair_seed(self.s_key, self.public_keys[peer]["s_pk"], self.context, self.site, peer)
                add_stream(masked, seed, subtract=self.site > peer)
        self.masked = True
        return masked

    def reveal(self, survivors: list[str], dropped: list[str]) -> dict[str, dict]:
        """Shares the server needs to unmask: self-seed shares of survivors, key shares of dropped sites."""
        if self.revealed:
            raise SecAggError("shares for this round were already revealed once")
        overlap = set(survivors) & set(dropped)
        if overlap:
            raise SecAggError(f"the server named {sorted(overlap)} both surviving and dropped; refusing to reveal")
        if set(survivors) | set(dropped) != set(self.participants):
            raise SecAggError("the server's survivors and dropped sites are not the round's participants")
        if len(survivors) < self.threshold:
            raise SecAggError(f"only {len(survivors)} surviving sites, fewer than the threshold {self.threshold}")
        self.revealed = True
        out = {}
        for site in survivors:
            out[site] = {"b": _share_hex(self.held_shares[site]["b"])}
        for site in dropped:
            out[site] = {"s": _share_hex(self.held_shares[site]["s"])}
        return out


def _pack(shares: dict) -> bytes:
    import json

    return json.dumps({k: [[i, v.hex()] for i, v in lst] for k, lst in shares.items()}).encode()


def _unpack(payload: bytes) -> dict:
    import json

    return {k: [(int(i), bytes.fromhex(v)) for i, v in lst] for k, lst in json.loads(payload).items()}


def _share_hex(share: list[tuple[int, bytes]]) -> list[list]:
    return [[i, v.hex()] for i, v in share]


def _share_from_hex(share: list[list]) -> list[tuple[int, bytes]]:
    return [(int(i), bytes.fromhex(v)) for i, v in share]


# --------------------------------------------------------------------------------------- server side
def unmask_sum(masked: dict[str, np.ndarray], public_keys: dict[str, dict], roster: list[str],
               participants: list[str], revelations: dict[str, dict[str, dict]], context: str) -> np.ndarray:
    """Remove all masks from the survivors' masked vectors; return their weighted sum as float64.

    ``roster`` gives the Shamir threshold, ``participants`` the sites that masked with each other;
    ``masked`` maps each survivor to its masked vector; ``revelations`` maps each revealing survivor to
    what ``SiteRound.reveal`` returned. Raises ``SecAggError`` when too few shares arrived.
    """
    return decode(unmask_ring(masked, public_keys, roster, participants, revelations, context))


def unmask_ring(masked: dict[str, np.ndarray], public_keys: dict[str, dict], roster: list[str],
                participants: list[str], revelations: dict[str, dict[str, dict]], context: str) -> np.ndarray:
    """``unmask_sum`` before decoding: the weighted sum as ring elements (uint32), for decoding in parts."""
    participants = site_order(participants)
    threshold = threshold_for(len(roster))
    survivors = site_order(masked)
    dropped = [s for s in participants if s not in masked]
    if len(survivors) < threshold:
        raise SecAggError(f"{len(survivors)} masked updates arrived, fewer than the threshold {threshold}; "
                          "the round cannot be unmasked and fails")
    if len(revelations) < threshold:
        raise SecAggError(f"{len(revelations)} sites revealed shares, fewer than the threshold {threshold}")
    total = np.zeros_like(next(iter(masked.values())), dtype=np.uint32)
    for vector in masked.values():
        total += vector
    for site in survivors:
        shares = [_share_from_hex(r[site]["b"]) for r in revelations.values() if "b" in r.get(site, {})]
        if len(shares) < threshold:
            raise SecAggError(f"only {len(shares)} shares of {site}'s self mask arrived; the round fails")
        add_stream(total, self_mask_key(combine_secret(shares[:threshold]), context), subtract=True)
    for gone in dropped:
        shares = [_share_from_hex(r[gone]["s"]) for r in revelations.values() if "s" in r.get(gone, {})]
        if len(shares) < threshold:
            raise SecAggError(f"only {len(shares)} shares of dropped site {gone}'s key arrived; the round fails")
        gone_key = X25519PrivateKey.from_private_bytes(combine_secret(shares[:threshold]))
        if public_bytes(gone_key) != bytes.fromhex(public_keys[gone]["s_pk"]):
            raise SecAggError(f"the key rebuilt for dropped site {gone} does not match its public key; the round fails")
        for site in survivors:
            # The survivor added the stream when it sorts before the dropped site, else subtracted it.
            add_stream(total, pair_seed(gone_key, bytes.fromhex(public_keys[site]["s_pk"]), context, gone, site),
                       subtract=site < gone)
    return total
