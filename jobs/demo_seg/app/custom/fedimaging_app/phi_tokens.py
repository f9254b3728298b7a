"""The PHI guard's identifier list: normalised tokens of a site's identifiers, stored as keyed hashes.

Preparation (``fedimaging prepare``) records every identifier it meets (patient names and IDs,
accession numbers, dates of birth, institution names, identifying slide properties and slide file
names) in ``phi_identifiers.json`` inside the prepared folder, as HMAC-SHA256 digests under the site's
pseudonym key. At training time the guard hashes the tokens of every outgoing string the same way and
blocks a message on any match. The file contains no identifier in clear text.

Matching rule, applied identically when recording and when checking:

- Text is Unicode-normalised (NFKD, accents removed) and lower-cased, then split into tokens of
  letters and digits; every other character, including DICOM's ``^`` name separator, spaces, dots,
  dashes and underscores, separates tokens. ``DOE^JANE``, ``Jane Doe`` and ``doe_jane.svs`` all give
  the tokens ``doe`` and ``jane``.
- A word of a patient name, patient ID or accession number is matched on its own when it has at
  least ``MIN_TOKEN_LENGTH`` (4) characters and is not a common word (``COMMON_WORDS``). Shorter
  words are too common to identify anyone (``DOE`` alone, an ``MR`` prefix) and are matched only as
  part of the whole identifier (below). Institution names, slide properties and slide file names are
  matched only whole, because their single words are ordinary ("small", "region").
- The whole identifier is matched too: its tokens joined with nothing (so ``MRN-0042-77`` matches
  ``mrn004277`` and ``MRN 0042 77``) and joined with one space (so ``Mercy General Hospital``
  matches as a phrase even though every word is common). Outgoing text is checked for runs of up to
  ``MAX_PHRASE_TOKENS`` consecutive tokens.
- Dates of birth are matched as dates: ``19800115`` (DICOM), ``1980-01-15``, ``1980/01/15``,
  ``15.01.1980``, ``01/15/1980`` and ``15/01/1980`` are all the same date.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

IDENTIFIER_FILE_NAME = "phi_identifiers.json"
FORMAT_VERSION = 1
MIN_TOKEN_LENGTH = 4
MAX_PHRASE_TOKENS = 6
# Words that appear in many institution names, placeholders for removed names, and vocabulary of
# fedimaging's own messages; none of them identifies a patient or a hospital on its own.
COMMON_WORDS = frozenset("""
    anonymous anonymized anonymised unknown none null patient patients test phantom sample case cases
    hospital hospitals clinic clinics clinical medical medicine center centre centers centres university
    universitaet universitat general institute institut health healthcare department dept radiology
    pathology imaging oncology cancer research foundation trust regional county city memorial saint
    children childrens women womens community national state central north south east west site
    aorta liver lung kidney tumor tumour other background tissue stroma normal train validate metrics
""".split())

KINDS = ("patient_name", "patient_id", "accession_number", "birth_date", "institution", "slide_property",
         "file_name")
# Kinds whose single words identify a person. For the other kinds (institution names, slide properties,
# file names) only the whole value counts, because their single words ("small", "region") are ordinary.
TOKEN_KINDS = frozenset({"patient_name", "patient_id", "accession_number"})

_TOKEN = re.compile(r"[a-z0-9]+")
_DATE_PATTERNS = (
    (re.compile(r"(?<!\d)(\d{4})(\d{2})(\d{2})(?!\d)"), ("y", "m", "d")),
    (re.compile(r"(?<!\d)(\d{4})[-/.](\d{1,2})[-/.](\d{1,2})(?!\d)"), ("y", "m", "d")),
    (re.compile(r"(?<!\d)(\d{1,2})[-/.](\d{1,2})[-/.](\d{4})(?!\d)"), ("d", "m", "y")),
    (re.compile(r"(?<!\d)(\d{1,2})[-/.](\d{1,2})[-/.](\d{4})(?!\d)"), ("m", "d", "y")),
)


def tokens(text: str) -> list[str]:
    """Normalised tokens of ``text`` (see the module's matching rule)."""
    decomposed = unicodedata.normalize("NFKD", str(text))
    plain = "".join(c for c in decomposed if not unicodedata.combining(c)).lower()
    return _TOKEN.findall(plain)


def dates(text: str) -> set[str]:
    """Every valid calendar date written in ``text``, as YYYYMMDD."""
    found = set()
    for pattern, order in _DATE_PATTERNS:
        for match in pattern.finditer(str(text)):
            parts = dict(zip(order, match.groups()))
            year, month, day = int(parts["y"]), int(parts["m"]), int(parts["d"])
            if 1800 <= year <= 2200 and 1 <= month <= 12 and 1 <= day <= 31:
                found.add(f"{year:04d}{month:02d}{day:02d}")
    return found


def _digest(key: bytes, kind: str, value: str) -> str:
    return hmac.new(key, f"fedimaging-phi:{kind}:{value}".encode(), hashlib.sha256).hexdigest()


def key_check(key: bytes) -> str:
    """A short digest that tells whether a list was made with this key (it reveals nothing of the key)."""
    return _digest(key, "key-check", "")[:16]


def identifier_forms(value: str, kind: str) -> list[tuple[str, str]]:
    """The (form, normalised value) pairs recorded for one identifier."""
    if kind == "birth_date":
        return [("date", d) for d in sorted(dates(value))]
    parts = tokens(value)
    if not parts or all(t in COMMON_WORDS or t.isdigit() and len(t) < MIN_TOKEN_LENGTH for t in parts):
        return []
    forms = []
    if kind in TOKEN_KINDS:
        forms += [("token", t) for t in parts if len(t) >= MIN_TOKEN_LENGTH and t not in COMMON_WORDS]
    joined = "".join(parts)
    if len(joined) >= MIN_TOKEN_LENGTH and len(parts) <= MAX_PHRASE_TOKENS:
        forms.append(("joined", joined))
        if len(parts) > 1:
            forms.append(("phrase", " ".join(parts)))
    return forms


@dataclass
class IdentifierList:
    """Keyed digests of a site's identifiers, each with the kind of identifier it came from."""

    key: bytes
    digests: dict[str, str] = field(default_factory=dict)  # digest -> kind

    def add(self, value: str | None, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown identifier kind {kind!r}")
        if value is None or not str(value).strip():
            return
        for form, normalised in identifier_forms(str(value), kind):
            self.digests.setdefault(_digest(self.key, form, normalised), kind)

    def __len__(self) -> int:
        return len(self.digests)

    def find(self, text: str) -> str | None:
        """The kind of the first recorded identifier found in ``text``, else None."""
        if not self.digests or not text:
            return None
        for date in dates(text):
            kind = self.digests.get(_digest(self.key, "date", date))
            if kind:
                return kind
        parts = tokens(text)
        for i, token in enumerate(parts):
            if len(token) >= MIN_TOKEN_LENGTH and token not in COMMON_WORDS:
                kind = self.digests.get(_digest(self.key, "token", token))
                if kind:
                    return kind
            for n in range(1, min(MAX_PHRASE_TOKENS, len(parts) - i) + 1):
                run = parts[i:i + n]
                joined = "".join(run)
                if len(joined) >= MIN_TOKEN_LENGTH:
                    kind = self.digests.get(_digest(self.key, "joined", joined))
                    if kind:
                        return kind
                if n > 1:
                    kind = self.digests.get(_digest(self.key, "phrase", " ".join(run)))
                    if kind:
                        return kind
        return None

    # ------------------------------------------------------------------------------------------ file
    def save(self, folder: Path, key_file: Path | None = None) -> Path:
        """Write the list; ``key_file`` (where the key lives at this site) lets the guard find the key."""
        path = Path(folder) / IDENTIFIER_FILE_NAME
        payload = {"format_version": FORMAT_VERSION, "hash": "HMAC-SHA256 with the site's pseudonym key",
                   "key_check": key_check(self.key), "key_file": str(key_file) if key_file else None,
                   "min_token_length": MIN_TOKEN_LENGTH,
                   "digests": dict(sorted(self.digests.items()))}
        path.write_text(json.dumps(payload, indent=1) + "\n")
        return path

    @staticmethod
    def recorded_key_file(folder: Path) -> Path | None:
        """The key file named in a folder's list, if any."""
        try:
            value = json.loads((Path(folder) / IDENTIFIER_FILE_NAME).read_text()).get("key_file")
        except (OSError, ValueError, AttributeError):
            return None
        return Path(value) if value else None

    @staticmethod
    def missing_error(folder: Path) -> ValueError:
        """Return the error for a prepared folder without an identifier list."""
        return ValueError(f"{Path(folder) / IDENTIFIER_FILE_NAME} is missing: prepare this site's data again with "
                          "this fedimaging version (fedimaging prepare records the identifiers the PHI guard checks)")

    @classmethod
    def load(cls, folder: Path, key: bytes) -> "IdentifierList":
        """Read a prepared folder's list; raises ``ValueError`` naming the file when it is unusable."""
        path = Path(folder) / IDENTIFIER_FILE_NAME
        try:
            payload = json.loads(path.read_text())
        except FileNotFoundError:
            raise cls.missing_error(folder) from None
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: unreadable identifier list ({exc}); prepare the data again") from exc
        if payload.get("format_version") != FORMAT_VERSION or not isinstance(payload.get("digests"), dict):
            raise ValueError(f"{path}: not an identifier list of format {FORMAT_VERSION}; prepare the data again")
        if payload.get("key_check") != key_check(key):
            raise ValueError(f"{path} was recorded with another pseudonym key than the one this site loads; point "
                             "the site configuration's key_file (or FEDIMAGING_KEY_FILE) at the key used by "
                             "fedimaging prepare")
        return cls(key, dict(payload["digests"]))

    @classmethod
    def load_or_new(cls, folder: Path, key: bytes) -> "IdentifierList":
        """The folder's list when it exists and matches the key (a re-run adds to it), else an empty one."""
        try:
            return cls.load(folder, key)
        except ValueError:
            return cls(key)
