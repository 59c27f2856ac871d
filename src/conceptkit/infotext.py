"""AUTOMATIC1111/Forge "infotext": the PNG `parameters` text chunk their PNG Info tab reads back.

The format (A1111 wiki, "Features: PNG info"; `modules/processing.py` `create_infotext`): the
prompt (any number of lines, LoRAs as `<lora:NAME:STRENGTH>` tags in it), then a line
`Negative prompt: ...` when there is one, then one line of `Key: value` pairs joined by ", "
(`Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 512x512, Model hash: ..., Model: ...`).
A value holding a comma, a colon, a quote or a newline is written as a JSON string.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from conceptkit import store

NEGATIVE = "Negative prompt:"
# one `Key: value` pair: a key of word characters, spaces, '-' and '/', then a JSON string or anything up to the next comma
_PAIR = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_LORA = re.compile(r"<lora:([^:>]+):([^:>]+)>")
SAMPLERS = {  # diffusers scheduler class -> A1111's sampler name
    "DDIMScheduler": "DDIM", "PNDMScheduler": "PLMS", "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a", "DPMSolverMultistepScheduler": "DPM++ 2M",
    "LMSDiscreteScheduler": "LMS", "HeunDiscreteScheduler": "Heun", "UniPCMultistepScheduler": "UniPC",
    "LCMScheduler": "LCM", "DPMSolverSinglestepScheduler": "DPM++ SDE",
}


@dataclass(frozen=True)
class Infotext:
    """One image's generation parameters in A1111's terms."""

    prompt: str  # with the `<lora:NAME:STRENGTH>` tags
    negative: str = ""
    params: dict[str, str] = field(default_factory=dict)  # "Steps" -> "20", "Size" -> "512x512", ... in order

    @property
    def loras(self) -> list[tuple[str, float]]:
        """The prompt's `<lora:NAME:STRENGTH>` tags as (NAME, STRENGTH)."""
        return [(m[1], float(m[2])) for m in _LORA.finditer(self.prompt)]


def quote(value) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:"\n') else text


def unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def lora_tag(name: str, strength: float) -> str:
    """`<lora:NAME:STRENGTH>`, the plain A1111 LoRA tag (applied from the first step)."""
    return f"<lora:{name}:{strength:g}>"


def format_infotext(info: Infotext) -> str:
    """The `parameters` text of one image."""
    for key in info.params:
        if not re.fullmatch(r"\w[\w \-/]*", key):
            raise ValueError(f"infotext key {key!r}: letters, digits, spaces, '-' and '/' only")
    lines = [info.prompt]
    if info.negative:
        lines.append(f"{NEGATIVE} {info.negative}")
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in info.params.items()))
    return "\n".join(lines)


def parse_infotext(text: str) -> Infotext:
    """Read `parameters` text back (what PNG Info does): prompt lines, negative prompt lines, the last line's pairs."""
    lines = text.strip().split("\n")
    params: dict[str, str] = {}
    last = lines[-1] if lines else ""
    pairs = list(_PAIR.finditer(last))
    if len(pairs) >= 3:  # A1111's rule: a last line with fewer than 3 pairs is still prompt
        params = {m[1].strip(): unquote(m[2].strip()) for m in pairs}
        lines = lines[:-1]
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith(NEGATIVE):
            in_negative = True
            line = line[len(NEGATIVE):].lstrip()
        (negative if in_negative else prompt).append(line)
    return Infotext("\n".join(prompt), "\n".join(negative), params)


def sampler_name(scheduler) -> str:
    """A1111's name for a diffusers scheduler (its class name where A1111 has none)."""
    return SAMPLERS.get(type(scheduler).__name__, type(scheduler).__name__)


def model_hash(model) -> str | None:
    """A1111's `Model hash` (first 10 hex digits of the checkpoint file's sha256) for a single-file model, else None."""
    from pathlib import Path

    if getattr(model, "source", None) != "single-file":
        return None
    path = Path(model.spec).expanduser()
    if not path.is_file():
        return None
    st = path.stat()
    return _file_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)[:10]


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, _size: int, _mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def slider_lora_name(set_name: str, index: int, label: str) -> str:
    """The kohya file name (without .safetensors) `sliders export` gives slider `index` of a set."""
    return f"{set_name}-{index:02d}-{store.slugify(label)}"


def for_generate(settings: dict, width: int, height: int, sampler: str, hash10: str | None) -> str:
    """The `parameters` text of a `generate` PNG: every slider and --lora file as a plain `<lora:NAME:STRENGTH>` tag."""
    tags = [lora_tag(slider_lora_name(s["set"], s["index"], s["label"]), s["scale"]) for s in settings.get("sliders", [])]
    tags += [lora_tag(f["name"], f["scale"]) for f in settings.get("loras", [])]
    params: dict[str, str] = {"Steps": str(settings["steps"]), "Sampler": sampler, "CFG scale": f"{settings['guidance']:g}",
                              "Seed": str(settings.get("seed", settings.get("seeds"))), "Size": f"{width}x{height}"}
    if hash10:
        params["Model hash"] = hash10
    params["Model"] = str(settings["model"]["spec"])
    starts = {m["sets"][n]["start"] for m in settings.get("modifications", []) if m.get("kind") == "sliders" for n in m["sets"]}
    if settings.get("sliders") and starts:
        params["Slider start"] = ", ".join(f"{s:g}" for s in sorted(starts))  # conceptkit applies sliders from this fraction on
    if settings.get("sweep"):
        params["Sweep"] = json.dumps(settings["sweep"], sort_keys=True)
    if settings.get("subconcepts"):
        params["Sub-concepts"] = " ".join(settings["subconcepts"])
    params["Version"] = f"conceptkit {settings.get('conceptkit', '')}".strip()
    return format_infotext(Infotext(" ".join([settings["prompt"], *tags]), "", params))


def write_png(image, path, settings: dict, model) -> None:
    """One PNG (image (3, H, W) in [0, 1]) with our settings (`conceptkit` chunk, JSON) and A1111's `parameters`."""
    import numpy as np
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    arr = (image.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    info = PngInfo()
    info.add_text("conceptkit", json.dumps(settings, sort_keys=True))
    info.add_text("parameters", for_generate(settings, arr.shape[1], arr.shape[0], sampler_name(model.pipe.scheduler), model_hash(model)))
    with store.atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG", pnginfo=info)
