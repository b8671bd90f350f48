"""job.py: a job is a TOML file plus command-line overrides, validated once into frozen dataclasses.

Owns the settings types every stage takes (`Endpoint`, `Prompt`, `ImageSettings`, `Limits`,
`Output`), their defaults, the job fingerprint that ties an out folder to one job, and the API key
look-up. Reads one file and the environment; sends nothing. Every problem is a `JobError` whose
one-line message names the file and the field and says what to do.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import JobError

__all__ = [
    "Endpoint",
    "Prompt",
    "ImageSettings",
    "InputSettings",
    "IMAGE_FORMATS",
    "Limits",
    "Output",
    "Cost",
    "Structured",
    "Batch",
    "Dedupe",
    "Engine",
    "Job",
    "OVERRIDABLE",
    "SECTIONS",
    "load_job",
    "resolve_api_key",
    "resolve_headers",
    "job_summary",
]

UNSET = object()
"""An override that drops a field the job file sets, so that its default applies (`--unset FIELD`)."""

LOCAL_BASE_URL = "local"
"""`base_url = "local"` starts the bundled endpoint in-process (see pipeline/localserver/)."""

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where requests go and how."""

    base_url: str = LOCAL_BASE_URL  # e.g. https://api.openai.com/v1, or "local"
    model: str = "local-caption"
    api_key_env: str | None = None  # name of the environment variable holding the key
    stream: bool = True  # SSE streaming with stream_options.include_usage
    headers: dict[str, str] = field(default_factory=dict)  # values may say ${ENV_VAR}
    mode: Literal["online", "batch"] = "online"  # batch: the Batch API (half price, results within a day)
    api: Literal["openai", "anthropic", "gemini"] = "openai"  # the wire protocol: chat completions, Messages, Gemini
    anthropic_version: str = "2023-06-01"  # api = "anthropic": the anthropic-version header sent
    service_tier: Literal["flex", "default", "auto"] | None = None  # api = "openai": sent as service_tier
    flex_fallback: Literal["off", "auto"] = "off"  # a flex 429 "Resource Unavailable": "auto" resends at the default tier


@dataclass(frozen=True, slots=True)
class Prompt:
    """What we ask. `temperature` and `reasoning_effort` are sent only when set."""

    user: str = "Describe this image."
    system: str | None = None
    max_tokens: int = 300
    temperature: float | None = None
    reasoning_effort: str | None = None
    language: str | None = None  # e.g. "German": the user prompt asks for the answer in it
    cache: bool = False  # prompt caching: Anthropic gets cache_control on the system prompt (README "Anthropic")


@dataclass(frozen=True, slots=True)
class ImageSettings:
    """How an image is shrunk and encoded before it is sent."""

    max_side: int = 1024  # long side in pixels after shrinking; never upscaled
    format: Literal["jpeg", "webp", "png"] = "jpeg"
    quality: int = 85  # JPEG/WebP quality, 1-100
    detail: Literal["low", "high", "auto"] = "auto"
    token_budget: int | None = None  # image tokens per image, by the model's formula: shrink until it fits


@dataclass(frozen=True, slots=True)
class InputSettings:
    """Which files under INPUT are read, and how much of each. Not part of the fingerprint: they
    decide which files are captioned, not what a caption says (so an out folder that took a sample
    takes the full run later, which skips what the sample did)."""

    follow_links: bool = False  # follow file and folder links that resolve outside INPUT (else: skipped, logged)
    max_file_mb: float = 256.0  # a larger file is refused from its size, unread: a bad_image row
    sample: int | None = None  # only a deterministic random sample of this many images (sources/sample.py)
    sample_seed: int = 0  # which sample: the same seed and folder pick the same images
    limit: int | None = None  # only the first this many images, in walk order
    # What INPUT is and how to read it (sources/__init__.py picks the source; the README's "Sources"):
    format: Literal["auto", "folder", "table", "webdataset", "hf"] = "auto"  # auto: from INPUT's name and contents
    storage_options: dict[str, Any] = field(default_factory=dict)  # given to the fsspec file system as they are
    path_column: str | None = None  # table: the column holding each image's local path, fsspec URL or http(s) URL
    bytes_column: str | None = None  # table: the column holding each image's bytes (or HF's {bytes, path} struct)
    key_column: str | None = None  # table: the resume key; default: the path, else the row's index
    keep_columns: tuple[str, ...] = ()  # input columns (or WebDataset members) copied into every output row
    send: Literal["bytes", "url"] = "bytes"  # http(s) images: download and encode them, or send the URL itself
    image_members: str = "jpg;png;webp"  # WebDataset: the members that may hold the image, in order of preference
    shard_keys: bool = False  # WebDataset: keys are "<shard name>/<__key__>", for datasets whose keys repeat across shards
    fetch_per_host: int = 8  # http(s) downloads in flight per host at most
    fetch_timeout_s: float = 30.0  # one download, whole
    fetch_attempts: int = 3  # per download, first try included; a failed one is an error row (error_kind "fetch")


IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "AVIF", "TIFF", "BMP", "JPEG2000", "ICO", "PPM", "TGA")
"""The Pillow formats that are images here: the image stage decodes only these (`images.ACCEPTED_FORMATS`),
and the folder source takes every file name ending Pillow registers for them (`sources/folder.py`).
Shared through the job module so that neither stage imports the other."""


@dataclass(frozen=True, slots=True)
class Limits:
    """How hard we push the provider and how long we wait for it."""

    concurrency: int = 16  # requests in flight at most
    rpm: int | None = None  # requests per minute; None: learned from x-ratelimit-limit-requests
    tpm: int | None = None  # tokens per minute; None: learned from x-ratelimit-limit-tokens
    rps: int | None = None  # requests per second (Together, relays); None: learned from a 429 naming it
    tps: int | None = None  # tokens per second; likewise
    max_attempts: int = 5  # per image, first try included
    timeout_s: float = 120.0  # one whole request
    idle_timeout_s: float = 60.0  # longest silence between two stream chunks
    retry_base_s: float = 1.0  # first backoff of a transient failure; doubles, with jitter
    retry_max_s: float = 60.0  # cap for backoffs and for waits a server asks for
    grace_s: float = 30.0  # on Ctrl-C/SIGTERM, how long in-flight requests may finish
    preprocess_workers: int = 0  # image threads; 0 = one per core


@dataclass(frozen=True, slots=True)
class Output:
    """How results become Parquet parts."""

    part_rows: int = 10_000  # roll a part after this many rows...
    part_seconds: float = 60.0  # ...or after this long, whichever comes first
    max_chars: int | None = None  # captions longer than this are flagged (never cut): alt-text limits
    # Answers shorter than this are asked for again (up to max_attempts: a gateway may have ended a
    # dropped upstream cleanly, "A"), then kept and flagged under_min_chars.
    min_chars: int | None = None


@dataclass(frozen=True, slots=True)
class Structured:
    """Ask for JSON instead of prose, and check every answer against a schema.

    `json_schema` sends the schema as `response_format` (OpenAI structured outputs, vLLM guided
    decoding); `json_object` only asks for some JSON object, for servers that support no more, and
    still checks the answer against `schema` when one is given.
    """

    format: Literal["text", "json_schema", "json_object"] = "text"
    name: str = "caption"  # the json_schema's name, as the API wants one
    strict: bool = True  # json_schema.strict: the server must follow the schema exactly
    schema: dict[str, Any] = field(default_factory=dict)  # a JSON Schema, as a TOML table


@dataclass(frozen=True, slots=True)
class Cost:
    """What `caption estimate` and `caption report` price with (runs are not changed by it)."""

    prices: str | None = None  # a TOML price file whose rows replace the bundled ones (pipeline/prices.toml)


@dataclass(frozen=True, slots=True)
class Batch:
    """How batch mode (`endpoint.mode = "batch"`) cuts, submits and watches its chunks.

    Provider limits: https://platform.openai.com/docs/guides/batch (50,000 requests, 200 MB a file).
    """

    max_requests: int = 50_000  # request lines per chunk file at most
    max_file_mb: float = 200.0  # chunk file size at most, MB (base64 images make this bind first)
    poll_s: float = 60.0  # how often a live batch is asked for its status
    completion_window: Literal["24h"] = "24h"  # sent with every batch; OpenAI accepts only "24h"


@dataclass(frozen=True, slots=True)
class Dedupe:
    """Which images take another's caption instead of being sent (identical bytes always do).

    Not part of the fingerprint: it decides which images are sent, not what an answer says, and
    every row that copied one names its original (`dedup_of`, `dedup_distance`).
    """

    near: bool = False  # also copy to images whose difference hash is within max_distance (online mode only)
    # Bits of 64 that may differ. Re-encodes, resizes and small brightness shifts of the bundled
    # samples land at 0-4; distinct samples are 16 or more apart (tests/test_near_dedupe.py).
    max_distance: int = 4


@dataclass(frozen=True, slots=True)
class Engine:
    """Where the work runs: this machine, or a Ray cluster (`caption[ray]`; README "Cluster").

    Not part of the fingerprint: the same job on a cluster writes the same rows.
    """

    name: Literal["local", "ray"] = "local"  # `--engine ray`: Ray Data on a cluster, one rate budget for all of it
    # What `ray.init(address=...)` takes: "auto", "HOST:PORT" of a running cluster, "ray://host:10001";
    # None: a cluster of this machine alone, started for the run.
    ray_address: str | None = None
    ray_actors: int = 0  # request actors (async, no CPU of their own); 0 = one per node of the cluster


@dataclass(frozen=True, slots=True)
class Job:
    """A whole job, validated. `extra` is merged into every request payload."""

    endpoint: Endpoint = field(default_factory=Endpoint)
    prompt: Prompt = field(default_factory=Prompt)
    image: ImageSettings = field(default_factory=ImageSettings)
    input: InputSettings = field(default_factory=InputSettings)
    limits: Limits = field(default_factory=Limits)
    output: Output = field(default_factory=Output)
    cost: Cost = field(default_factory=Cost)
    structured: Structured = field(default_factory=Structured)
    batch: Batch = field(default_factory=Batch)
    dedupe: Dedupe = field(default_factory=Dedupe)
    engine: Engine = field(default_factory=Engine)
    extra: dict[str, Any] = field(default_factory=dict)  # [request.extra]
    source: str = "<defaults>"  # the file it came from, for messages

    @property
    def fingerprint(self) -> str:
        """Hash of what decides the answers: model, prompt, image settings, extra parameters.

        Not the endpoint URL, key, headers, mode, input, limits, output, batch or dedupe settings: changing those
        does not change what a caption means, so a run may resume under them (online after batch too).
        """
        decisive = {
            "model": self.endpoint.model,
            "prompt": dataclasses.asdict(self.prompt),
            "image": dataclasses.asdict(self.image),
            "extra": self.extra,
        }
        if self.prompt.language is None:
            del decisive["prompt"]["language"]  # fields added later leave older fingerprints as they were
        del decisive["prompt"]["cache"]  # caching changes what a request costs, not what it asks
        if self.image.token_budget is None:
            del decisive["image"]["token_budget"]
        if self.structured.format != "text":
            decisive["structured"] = dataclasses.asdict(self.structured)
        blob = json.dumps(decisive, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


_SECTIONS: dict[str, type] = {
    "endpoint": Endpoint,
    "prompt": Prompt,
    "image": ImageSettings,
    "input": InputSettings,
    "limits": Limits,
    "output": Output,
    "cost": Cost,
    "structured": Structured,
    "batch": Batch,
    "dedupe": Dedupe,
    "engine": Engine,
}

SECTIONS = _SECTIONS
"""Section name → its settings dataclass."""

_PREFIXED = ("batch", "structured", "dedupe")

def _flag_names() -> dict[str, str]:
    names: dict[str, str] = {}
    for section, cls in _SECTIONS.items():
        for f in dataclasses.fields(cls):
            if str(f.type).startswith(("dict", "tuple")):  # tables and lists (headers, schema) live in the job file only
                continue
            name = f"{section}_{f.name}" if section in _PREFIXED else f.name
            if name in names:  # a name an earlier section took ([image] format before [input] format)
                name = f"{section}_{f.name}"
            assert name not in names, name
            names[name] = f"{section}.{f.name}"
    return names


OVERRIDABLE: dict[str, str] = _flag_names()
"""Flag name (underscores) → dotted job field. `caption run --max-side 512` sets image.max_side;
the [batch], [structured] and [dedupe] fields take their section as a prefix (`--batch-poll-s 5`,
`--structured-format json_object`, `--dedupe-near`), and so does a field whose name an earlier
section already took (`--format webp` is [image] format, `--input-format table` is [input] format)."""
OVERRIDABLE["engine"] = OVERRIDABLE.pop("name")  # `--engine ray` sets [engine] name (a bare `--name` says nothing)


def load_job(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Job:
    """Read a TOML job file (None: defaults), apply `{"section.field": value}` overrides, validate.

    Raises JobError with a one-line message naming the file and the field.
    """
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise JobError(f"{source}: job file not found") from None
        except (OSError, UnicodeDecodeError) as err:
            raise JobError(f"{source}: cannot read job file: {err}") from None
        except tomllib.TOMLDecodeError as err:
            raise JobError(f"{source}: not valid TOML: {err}") from None
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for dotted, value in (overrides or {}).items():
        section, name = dotted.split(".", 1)
        if value is UNSET:
            raw.get(section, {}).pop(name, None)
        else:
            raw.setdefault(section, {})[name] = value
    return _build_job(raw, source)


def _build_job(raw: dict[str, Any], source: str) -> Job:
    allowed = set(_SECTIONS) | {"request"}
    for key in raw:
        if key not in allowed:
            raise JobError(f"{source}: unknown section [{key}]{_did_you_mean(key, allowed)}")
    request = raw.get("request", {})
    if not isinstance(request, dict) or set(request) - {"extra"}:
        raise JobError(f"{source}: [request] may only hold the table [request.extra]")
    extra = request.get("extra", {})
    if not isinstance(extra, dict):
        raise JobError(f"{source}: [request.extra] must be a table of payload fields")
    for reserved in ("model", "messages", "stream", "stream_options"):
        if reserved in extra:
            raise JobError(f"{source}: [request.extra] {reserved} is set by caption itself; remove it")
    parts = {name: _build_section(cls, raw.get(name, {}), name, source) for name, cls in _SECTIONS.items()}
    parts["limits"] = _flex_timeouts(parts["endpoint"], parts["limits"], raw.get("limits", {}))
    job = Job(**parts, extra=extra, source=source)
    _check_ranges(job)
    return job


FLEX_TIMEOUT_S = 900.0
"""`timeout_s` and `idle_timeout_s` when `service_tier = "flex"` and the job sets neither: flex answers
are slower and may queue before the first byte; OpenAI advises raising the timeout to 15 minutes
(https://platform.openai.com/docs/guides/flex-processing, "API request timeouts")."""


def _flex_timeouts(endpoint: Endpoint, limits: Limits, table: Any) -> Limits:
    """`limits` with FLEX_TIMEOUT_S for the timeouts the job leaves unset, when the job asks for flex."""
    if endpoint.service_tier != "flex" or not isinstance(table, dict):
        return limits
    longer = {name: FLEX_TIMEOUT_S for name in ("timeout_s", "idle_timeout_s") if name not in table}
    return dataclasses.replace(limits, **longer)


def _build_section(cls: type, table: Any, section: str, source: str) -> Any:
    if not isinstance(table, dict):
        raise JobError(f"{source}: [{section}] must be a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in names:
            raise JobError(f"{source}: [{section}] unknown key '{key}'{_did_you_mean(key, names)}")
        values[key] = _coerce(value, hints[key], f"{source}: [{section}] {key}")
    return cls(**values)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against a field's type hint; return it (ints widened to float where asked)."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)][0]
        return _coerce(value, inner, where)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise JobError(f"{where} must be one of {', '.join(map(repr, choices))}, not {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise JobError(f"{where} must be a table")
        if typing.get_args(hint)[1] is str and not all(isinstance(v, str) for v in value.values()):
            raise JobError(f"{where} values must be strings")
        return dict(value)
    if origin is tuple:  # a TOML array of one type (tuple[str, ...])
        if not isinstance(value, list):
            raise JobError(f"{where} must be a list, not {value!r}")
        return tuple(_coerce(item, typing.get_args(hint)[0], where) for item in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise JobError(f"{where} must be true or false, not {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise JobError(f"{where} must be a whole number, not {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise JobError(f"{where} must be a number, not {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise JobError(f"{where} must be a string, not {value!r}")
        return value
    raise AssertionError(f"no coercion for {hint!r}")  # a new field type needs a branch here


_RANGES: list[tuple[str, float, float]] = [
    ("prompt.max_tokens", 1, 1_000_000),
    ("prompt.temperature", 0, 2),
    ("image.max_side", 16, 8192),
    ("image.quality", 1, 100),
    ("image.token_budget", 1, 1_000_000),
    ("input.max_file_mb", 0.001, 1_000_000),
    ("input.sample", 1, 2**62),
    ("input.sample_seed", -(2**63), 2**63 - 1),  # blake2b takes it as an 8-byte key
    ("input.limit", 1, 2**62),
    ("input.fetch_per_host", 1, 1_000),
    ("input.fetch_timeout_s", 0.001, 86_400),
    ("input.fetch_attempts", 1, 100),
    ("limits.concurrency", 1, 10_000),
    ("limits.rpm", 1, 100_000_000),
    ("limits.tpm", 1, 10_000_000_000),
    ("limits.rps", 1, 10_000_000),
    ("limits.tps", 1, 1_000_000_000),
    ("limits.max_attempts", 1, 100),
    ("limits.timeout_s", 0.001, 86_400),
    ("limits.idle_timeout_s", 0.001, 86_400),
    ("limits.retry_base_s", 0, 3_600),
    ("limits.retry_max_s", 0, 86_400),
    ("limits.grace_s", 0, 86_400),
    ("limits.preprocess_workers", 0, 256),
    ("engine.ray_actors", 0, 10_000),
    ("output.part_rows", 1, 10_000_000),
    ("output.part_seconds", 0.001, 86_400),
    ("output.min_chars", 1, 100_000),
    ("batch.max_requests", 1, 50_000),  # OpenAI's limits per batch file: https://platform.openai.com/docs/guides/batch
    ("batch.max_file_mb", 0.001, 200),
    ("batch.poll_s", 0.001, 86_400),
    ("dedupe.max_distance", 0, 8),  # 9 bands of 7 bits at 8: past that the band index nears a linear scan
]


def _check_ranges(job: Job) -> None:
    for dotted, low, high in _RANGES:
        section, name = dotted.split(".")
        value = getattr(getattr(job, section), name)
        if value is not None and not low <= value <= high:
            raise JobError(f"{job.source}: [{section}] {name} = {value} is out of range ({low} to {high})")
    if job.input.send == "url" and job.endpoint.api == "gemini":
        raise JobError(f"{job.source}: [input] send = \"url\" is for api = \"openai\" or \"anthropic\" (Gemini takes "
                       "images inline here); use send = \"bytes\"")
    if job.input.sample is not None and job.input.limit is not None:
        raise JobError(f"{job.source}: [input] sample and limit pick the images two ways; give one of them")
    if not job.endpoint.model.strip():
        raise JobError(f"{job.source}: [endpoint] model must not be empty")
    url = job.endpoint.base_url
    if url != LOCAL_BASE_URL and not re.match(r"^https?://[^/\s]+", url):
        raise JobError(f"{job.source}: [endpoint] base_url must be http(s)://host/... or \"local\", not {url!r}")
    _check_tier_and_cache(job)
    _check_schema(job)


def _check_tier_and_cache(job: Job) -> None:
    """`service_tier` is OpenAI's and online only; `flex_fallback` needs flex; Anthropic caches the system prompt."""
    endpoint = job.endpoint
    if endpoint.service_tier is not None and endpoint.api != "openai":
        raise JobError(f"{job.source}: [endpoint] service_tier is OpenAI's (api = \"openai\"); remove it for "
                       f"api = \"{endpoint.api}\"")
    if endpoint.service_tier is not None and endpoint.mode == "batch":
        raise JobError(f"{job.source}: [endpoint] service_tier is for online requests; batch mode is already at "
                       "batch prices: remove it, or run with --mode online")
    if endpoint.flex_fallback != "off" and endpoint.service_tier != "flex":
        raise JobError(f"{job.source}: [endpoint] flex_fallback applies only with service_tier = \"flex\"")
    if job.prompt.cache and endpoint.api == "anthropic" and not job.prompt.system:
        raise JobError(f"{job.source}: [prompt] cache = true caches the system prompt for api = \"anthropic\"; "
                       "set [prompt] system (or remove cache)")


def _check_schema(job: Job) -> None:
    structured = job.structured
    if structured.format == "text":
        return
    if structured.format == "json_schema" and not structured.schema:
        raise JobError(f"{job.source}: [structured] format = \"json_schema\" needs a [structured.schema] table")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", structured.name):
        raise JobError(f"{job.source}: [structured] name must be 1-64 letters, digits, _ or -, not {structured.name!r}")
    prompt_text = f"{job.prompt.system or ''} {job.prompt.user}"
    if structured.format == "json_object" and "json" not in prompt_text.lower():
        # https://platform.openai.com/docs/guides/structured-outputs#json-mode
        raise JobError(f"{job.source}: [structured] format = \"json_object\" needs the word JSON in [prompt] "
                       "system or user (the API refuses the request otherwise)")
    if structured.schema:
        import jsonschema  # only jobs with a schema pay for the import

        try:
            jsonschema.validators.validator_for(structured.schema).check_schema(structured.schema)
        except jsonschema.SchemaError as err:
            where = "/".join(map(str, err.path)) or "top level"
            raise JobError(f"{job.source}: [structured.schema] is not a valid JSON Schema ({where}): "
                           f"{err.message}") from None
    if structured.format == "json_schema" and structured.strict:
        problem = _strict_problem(structured.schema, "the schema")
        if problem:
            raise JobError(f"{job.source}: [structured.schema] {problem}, which strict mode requires "
                           "(https://platform.openai.com/docs/guides/structured-outputs#supported-schemas); "
                           "fix it or set [structured] strict = false")


def _strict_problem(schema: Any, where: str) -> str | None:
    """What in `schema` breaks OpenAI's strict structured outputs, or None: the root is an object,
    and every object lists all its properties in `required` and sets additionalProperties false."""
    if not isinstance(schema, dict):
        return None
    if where == "the schema" and schema.get("type") != "object":
        return "must have type = \"object\" at the top"
    properties = schema.get("properties")
    if isinstance(properties, dict):
        if schema.get("additionalProperties") is not False:
            return f"{where}: must set additionalProperties = false"
        missing = sorted(set(properties) - set(schema.get("required") or []))
        if missing:
            return f"{where}: must list {', '.join(missing)} in required"
        for name, sub in properties.items():
            if problem := _strict_problem(sub, f"property {name}"):
                return problem
    items = schema.get("items")
    return _strict_problem(items, f"{where} items") if isinstance(items, dict) else None


def _did_you_mean(word: str, options: set[str]) -> str:
    """The closest option by edit distance, a swap of two neighbours counting one edit (so `modle`
    is `model`, not `mode`); ties go to the option of the same length, then to difflib's ratio."""
    close = difflib.get_close_matches(word, sorted(options), n=3, cutoff=0.6)
    if not close:
        return ""
    best = min(close, key=lambda option: (_edits(word, option), abs(len(option) - len(word)),
                                          -difflib.SequenceMatcher(None, word, option).ratio()))
    return f" (did you mean '{best}'?)"


def _edits(a: str, b: str) -> int:
    """Optimal string alignment distance: insertions, deletions, substitutions, adjacent swaps."""
    rows = [list(range(len(b) + 1))]
    for i, ca in enumerate(a, 1):
        row = [i]
        for j, cb in enumerate(b, 1):
            row.append(min(rows[-1][j] + 1, row[j - 1] + 1, rows[-1][j - 1] + (ca != cb)))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                row[j] = min(row[j], rows[-2][j - 2] + 1)
        rows.append(row)
    return rows[-1][-1]


def resolve_api_key(job: Job) -> str | None:
    """Return the API key from the environment variable the job names (None if it names none).

    Raises JobError when the variable is named but unset or empty. The key itself never appears in
    any message.
    """
    var = job.endpoint.api_key_env
    if not var:
        return None
    key = os.environ.get(var, "").strip()
    if not key:
        raise JobError(
            f"{job.source}: [endpoint] api_key_env names {var}, which is not set; "
            f"export {var}=<your key> (or pass --api-key-env OTHER_VAR)"
        )
    return key


def resolve_headers(job: Job) -> dict[str, str]:
    """Return the job's extra headers with every ${VAR} replaced from the environment."""

    def expand(match: re.Match[str]) -> str:
        value = os.environ.get(match.group(1))
        if value is None:
            raise JobError(f"{job.source}: [endpoint.headers] uses ${{{match.group(1)}}}, which is not set")
        return value

    headers = {}
    for name, value in job.endpoint.headers.items():
        if not _HEADER_NAME.fullmatch(name):
            raise JobError(f"{job.source}: [endpoint.headers] {name!r} is not a valid HTTP header name")
        value = _ENV_REF.sub(expand, value).strip()
        if "\r" in value or "\n" in value:
            raise JobError(f"{job.source}: [endpoint.headers] {name} has a line break in its value")
        headers[name] = value
    return headers


def job_summary(job: Job) -> dict[str, Any]:
    """The job as run, for `_job.json`: every setting, header names but not their values."""
    summary = {name: dataclasses.asdict(getattr(job, name)) for name in _SECTIONS}
    summary["endpoint"]["headers"] = sorted(job.endpoint.headers)
    summary["input"]["storage_options"] = sorted(job.input.storage_options)  # names only: they may hold credentials
    summary["request"] = {"extra": job.extra}
    summary["fingerprint"] = job.fingerprint
    summary["source"] = job.source
    return summary
