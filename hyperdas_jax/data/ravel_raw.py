"""Reads the raw RAVEL benchmark (data.tgz or an extracted folder) into one object per domain."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import tarfile
import tempfile
import urllib.error
import urllib.request
from typing import Any, Mapping

# The five entity types RAVEL ships, in the order of its README.
RAVEL_DOMAINS = ("city", "nobel_prize_winner", "occupation", "physical_object", "verb")

# sha256 of the official archive (explanare/ravel, 429,309 bytes). A download whose hash differs
# is refused: every generated data set is only reproducible from byte-identical JSON.
RAVEL_SHA256 = "b148f0ded1979cb0e17e301cfda41cb120517a109d3c758cc768e376946d96bc"
# The archive sits at the root of the RAVEL repository; HEAD follows its default branch.
RAVEL_URL = "https://github.com/explanare/ravel/raw/HEAD/data.tgz"
# The package ships that archive (MIT licence, text beside it), so no step needs a network.
BUNDLED_RAVEL = pathlib.Path(__file__).resolve().parent / "ravel" / "data.tgz"

# RAVEL's three-way splits, as HyperDAS groups them: its "test" templates are RAVEL's val + test.
SPLIT_GROUPS = {"train": ("train",), "test": ("val", "test")}
_RAVEL_SPLITS = ("train", "val", "test")

_DEFAULT_CACHE = pathlib.Path("~/.cache/hyperdas_jax/ravel")
_DOWNLOAD_TIMEOUT_S = 60


class RavelError(ValueError):
    """Raised for any unusable RAVEL input: bad path or URL, missing or malformed file, bad name."""


@dataclasses.dataclass(frozen=True)
class WikipediaFragment:
    """One Wikipedia sentence fragment with its entity replaced by `%s`.

    Attributes:
        template: the fragment text, holding exactly one `%s`.
        split: the fragment's own (prompt) split: "train", "val" or "test".
        entity: the entity the sentence was about, or None for generic fragments.
    """

    template: str
    split: str
    entity: str | None


@dataclasses.dataclass(frozen=True)
class RavelDomain:
    """Everything RAVEL holds for one entity type.

    Attributes:
        name: domain name, one of RAVEL_DOMAINS.
        entity_attributes: entity -> {attribute -> ground-truth value}; values may be "" (unknown).
        attribute_templates: attribute -> templates, each with exactly one `%s` for the entity.
        template_split: template -> "train" / "val" / "test".
        entity_split: entity -> "train" / "val" / "test".
        wikipedia: Wikipedia fragments, in file order.
    """

    name: str
    entity_attributes: Mapping[str, Mapping[str, str]]
    attribute_templates: Mapping[str, tuple[str, ...]]
    template_split: Mapping[str, str]
    entity_split: Mapping[str, str]
    wikipedia: tuple[WikipediaFragment, ...]

    @property
    def attributes(self) -> tuple[str, ...]:
        """All attributes that have templates, in file order."""
        return tuple(self.attribute_templates)

    @property
    def valued_attributes(self) -> tuple[str, ...]:
        """Attributes that have templates and a non-empty value for at least one entity.

        Occupation's "Gender Bias" has templates but no values, so it is left out here.
        """
        have_values = {a for values in self.entity_attributes.values() for a, v in values.items() if v.strip()}
        return tuple(a for a in self.attribute_templates if a in have_values)

    def templates(self, attribute: str, split: str) -> tuple[str, ...]:
        """Templates of `attribute` in a HyperDAS split group ("train" or "test" = val + test)."""
        wanted = SPLIT_GROUPS[split]
        return tuple(t for t in self.attribute_templates[attribute] if self.template_split[t] in wanted)

    def entities(self, split: str) -> tuple[str, ...]:
        """Entities in a split group: "both" (all), "train", or "test" (= val + test)."""
        if split == "both":
            return tuple(self.entity_attributes)
        wanted = SPLIT_GROUPS[split]
        return tuple(e for e in self.entity_attributes if self.entity_split[e] in wanted)


def _file_names(domain: str) -> dict[str, str]:
    return {
        "entity_attributes": f"ravel_{domain}_entity_attributes.json",
        "attribute_to_prompts": f"ravel_{domain}_attribute_to_prompts.json",
        "prompt_to_split": f"ravel_{domain}_prompt_to_split.json",
        "entity_to_split": f"ravel_{domain}_entity_to_split.json",
        "wikipedia": f"wikipedia_{domain}_entity_prompts.json",
    }


def _is_url(source: Any) -> bool:
    return isinstance(source, str) and source.startswith(("http://", "https://"))


def _sha256_of(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_bundled(path: pathlib.Path = BUNDLED_RAVEL, sha256: str = RAVEL_SHA256) -> None:
    """Refuses the packaged archive unless it is byte-identical to the official one.

    Raises:
        RavelError: the file is missing, truncated or altered (one line naming the file).
    """
    if not path.is_file():
        raise RavelError(f"the packaged RAVEL archive {path} is missing; reinstall hyperdas_jax")
    got = _sha256_of(path)
    if got != sha256:
        raise RavelError(f"the packaged RAVEL archive {path} is damaged ({path.stat().st_size} bytes, "
                         f"sha256 {got}, expected {sha256}); reinstall hyperdas_jax")


def resolve_ravel(
    path_or_url: str | os.PathLike = BUNDLED_RAVEL,
    cache_dir: str | os.PathLike | None = None,
    *,
    sha256: str = RAVEL_SHA256,
) -> pathlib.Path:
    """Returns a local RAVEL source (archive or folder), downloading it once if given a URL.

    A URL is fetched into `cache_dir/data.tgz`. The download goes to a temporary file in the same
    folder and is renamed only after its sha256 matched, so an interrupted or wrong download never
    leaves a file that a later call would trust.

    Args:
        path_or_url: a `data.tgz`, an extracted folder, or an http(s) URL of the archive; by default
            the archive packaged with hyperdas_jax (its sha256 is checked each time it is opened).
        cache_dir: where downloads are kept; default `~/.cache/hyperdas_jax/ravel/`.
        sha256: expected hash of a downloaded archive (the official archive's by default).

    Returns:
        Path of an existing local archive or folder.

    Raises:
        RavelError: the path does not exist, the URL cannot be fetched, or the hash differs.
    """
    if not _is_url(path_or_url):
        path = pathlib.Path(path_or_url).expanduser()
        if not path.exists():
            raise RavelError(f"RAVEL source not found: {path}")
        if path.resolve() == BUNDLED_RAVEL:
            check_bundled(path, sha256)
        return path
    url = str(path_or_url)
    cache = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else _DEFAULT_CACHE.expanduser()
    target = cache / "data.tgz"
    if target.is_file() and _sha256_of(target) == sha256:
        return target
    created = not cache.exists()
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".data.tgz.", suffix=".part", dir=cache)
    tmp = pathlib.Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
                    for block in iter(lambda: response.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
            except (urllib.error.URLError, OSError, ValueError) as e:
                reason = getattr(e, "reason", e)
                raise RavelError(f"cannot download RAVEL from {url}: {reason}") from e
        if digest.hexdigest() != sha256:
            raise RavelError(
                f"RAVEL download from {url} has sha256 {digest.hexdigest()}, expected {sha256}"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
        # A failed first download leaves no trace, not even the cache folder it made.
        if created and not target.exists() and not any(cache.iterdir()):
            cache.rmdir()
    return target


def _read_raw_files(source: pathlib.Path, names: list[str]) -> dict[str, bytes]:
    """Reads the named JSON files from an archive or folder, with or without the `data/` level."""
    found: dict[str, bytes] = {}
    if source.is_dir():
        for name in names:
            for candidate in (source / name, source / "data" / name):
                if candidate.is_file():
                    found[name] = candidate.read_bytes()
                    break
    else:
        try:
            with tarfile.open(source, "r:*") as archive:
                members = {pathlib.PurePosixPath(m.name): m for m in archive.getmembers() if m.isfile()}
                for name in names:
                    for candidate in (pathlib.PurePosixPath(name), pathlib.PurePosixPath("data", name)):
                        if candidate in members:
                            found[name] = archive.extractfile(members[candidate]).read()
                            break
        except (tarfile.TarError, OSError, EOFError) as e:
            raise RavelError(f"cannot read RAVEL archive {source}: {e}") from e
    missing = [n for n in names if n not in found]
    if missing:
        raise RavelError(f"RAVEL file missing from {source}: {', '.join(missing)}")
    return found


def _parse(name: str, raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RavelError(f"malformed JSON in RAVEL file {name}: {e}") from e


def _check(condition: bool, name: str, what: str) -> None:
    if not condition:
        raise RavelError(f"unexpected content in RAVEL file {name}: {what}")


def _is_str_map(obj: Any) -> bool:
    return isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in obj.items())


def load_domain(source: str | os.PathLike | None, domain: str) -> RavelDomain:
    """Loads and validates one RAVEL domain.

    Args:
        source: a `data.tgz`, an extracted folder (with or without the `data/` level), a URL
            (resolved through `resolve_ravel` with the default cache), or None for the packaged archive.
        domain: one of RAVEL_DOMAINS.

    Returns:
        The domain's entities, templates, splits and Wikipedia fragments.

    Raises:
        RavelError: unknown domain, missing file, malformed JSON or unexpected structure; the
            message names the domain or the file.
    """
    if domain not in RAVEL_DOMAINS:
        raise RavelError(f"unknown RAVEL domain {domain!r}; known: {', '.join(RAVEL_DOMAINS)}")
    path = resolve_ravel(BUNDLED_RAVEL if source is None else source)
    files = _file_names(domain)
    raw = _read_raw_files(path, list(files.values()))
    data = {key: _parse(name, raw[name]) for key, name in files.items()}

    name = files["entity_attributes"]
    entity_attributes = data["entity_attributes"]
    _check(isinstance(entity_attributes, dict) and bool(entity_attributes), name, "expected a non-empty object")
    _check(all(_is_str_map(v) for v in entity_attributes.values()), name, "values must map attribute -> string")

    name = files["attribute_to_prompts"]
    attribute_to_prompts = data["attribute_to_prompts"]
    _check(isinstance(attribute_to_prompts, dict) and bool(attribute_to_prompts), name, "expected a non-empty object")
    for attribute, templates in attribute_to_prompts.items():
        _check(
            isinstance(templates, list) and all(isinstance(t, str) for t in templates),
            name,
            f"templates of {attribute!r} must be a list of strings",
        )
        for template in templates:
            _check(template.count("%s") == 1, name, f"template without exactly one %s: {template!r}")

    name = files["prompt_to_split"]
    template_split = data["prompt_to_split"]
    _check(_is_str_map(template_split), name, "expected template -> split strings")
    for templates in attribute_to_prompts.values():
        for template in templates:
            _check(template_split.get(template) in _RAVEL_SPLITS, name, f"no valid split for {template!r}")

    name = files["entity_to_split"]
    entity_split = data["entity_to_split"]
    _check(_is_str_map(entity_split), name, "expected entity -> split strings")
    for entity in entity_attributes:
        _check(entity_split.get(entity) in _RAVEL_SPLITS, name, f"no valid split for entity {entity!r}")

    name = files["wikipedia"]
    wikipedia = data["wikipedia"]
    _check(isinstance(wikipedia, dict), name, "expected an object")
    fragments = []
    for template, info in wikipedia.items():
        _check(
            isinstance(info, dict)
            and info.get("split") in _RAVEL_SPLITS
            and (info.get("entity") is None or isinstance(info.get("entity"), str)),
            name,
            f"bad record for fragment {template!r}",
        )
        _check(template.count("%s") == 1, name, f"fragment without exactly one %s: {template!r}")
        fragments.append(WikipediaFragment(template, info["split"], info.get("entity")))

    return RavelDomain(
        name=domain,
        entity_attributes=entity_attributes,
        attribute_templates={a: tuple(t) for a, t in attribute_to_prompts.items()},
        template_split=template_split,
        entity_split=entity_split,
        wikipedia=tuple(fragments),
    )
