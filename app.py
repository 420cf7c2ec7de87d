"""FastComposer Studio: the web app (Gradio 6). A thin layer over the `fastcomposer` library.

    python app.py                      # http://127.0.0.1:7860, weights downloaded on first start
    python app.py --weights tiny       # a preview on random weights (no download)
    python app.py --public             # listen on 0.0.0.0 with public-server settings

Nothing is loaded at import: `create_demo(get_pipeline, ...)` builds the page around a pipeline
factory, so tests can build it around the tiny model.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import gradio as gr

from fastcomposer.config import SETTINGS, Settings

logger = logging.getLogger("fastcomposer.app")

ROOT = Path(__file__).resolve().parent
ASSETS = ROOT / "assets"
MAX_SLOTS = 4  # photo slots on the page (and photo_1..photo_4 in the API); Limits.max_subjects caps their use
SAMPLERS = [("PNDM · original, 50 steps", "pndm"), ("DPM++ 2M · fast, 25 steps", "dpm"), ("DDIM", "ddim"),
            ("Euler", "euler")]

try:  # ZeroGPU Spaces: borrow a GPU per call. Elsewhere a no-op (importing `spaces` can fail locally).
    import spaces

    gpu = spaces.GPU(duration=120)
except Exception:  # noqa: BLE001 - any import failure means "not on a Space"
    def gpu(fn: Callable) -> Callable:
        return fn

HOW_TO = """\
# FastComposer Studio
1. Upload one photo per person: photo 1 goes with the first `img`, photo 2 with the second, and so on.
2. Write a prompt with `img` right after each subject word: *a woman img and a man img hiking in the Alps*.
3. Press **Generate**. No fine-tuning: one pass per image ([FastComposer](https://arxiv.org/abs/2305.10431)).
"""
CONSENT = ("Only use photos of people who agreed to it. Do not create images that deceive, harass or sexualise "
           "anyone. Uploaded photos are kept only for this session and deleted from the server within an hour.")
EXAMPLES = [
    ["a woman img in a sunflower field, golden hour, photo", "astronaut.png", None],
    ["a woman img and a woman img having tea in a garden", "astronaut.png", "grace_hopper.jpg"],
    ["a painting of a man img in the style of Van Gogh", "camera.png", None],
]


def create_demo(
    get_pipeline: Callable[[], object],
    banner: str | None = None,
    settings: Settings = SETTINGS,
    cropper=None,
) -> gr.Blocks:
    """Build the page.

    Args:
        get_pipeline: returns the (cached) FastComposerPipeline; called on the first Generate.
        banner: a notice shown on top, e.g. why the app runs on preview weights.
        cropper: a `faces.FaceCropper`; the process-wide default when None.
    """
    from fastcomposer.faces import NoFaceFoundError, default_cropper
    from fastcomposer.generation import GenerationError, GenerationRequest, free_memory, generate, validate
    from fastcomposer.hints import prompt_hint
    from fastcomposer.images import ImageError, load_image
    from fastcomposer.messages import message_for
    from fastcomposer.metadata import read_record
    from fastcomposer.prompt import load_tokenizer

    d, limits = settings.defaults, settings.limits
    tokenizer = load_tokenizer()
    cropper = cropper or default_cropper()
    stops: dict[str, threading.Event] = {}  # per browser session: set by Stop, read between denoising steps

    # -- helpers (pure functions of their inputs) -------------------------------------------------------

    def photos_of(files: list) -> list[tuple[int, str]]:
        return [(k, f) for k, f in enumerate(files) if f]

    def load_subject(k: int, path: str, face_crop: bool, whole: bool):
        """Photo k+1 -> (photo, what the encoder sees, status). Raises ImageError, NoFaceFoundError, or
        ValueError when no face detector can run at all; callers choose how to show each."""
        name = f"photo {k + 1}"
        image = load_image(path, name=name, limits=limits)
        if not face_crop or whole:
            return image, image, f"{name}: whole photo"
        crop = cropper.crop(image, name=name)
        note = f" ({crop.num_faces} faces: the largest is used)" if crop.num_faces > 1 else ""
        return image, crop.image, f"{name}: face found ✓{note}"

    def subject_or_error(k: int, path: str, face_crop: bool, whole: bool):
        """`load_subject` for a generation: every problem becomes a gr.Error naming the photo (never its path)."""
        try:
            return load_subject(k, path, face_crop, whole)
        except ImageError as e:
            raise gr.Error(e.message_for("page"), title="Photo problem") from None
        except NoFaceFoundError as e:
            raise gr.Error(e.message_for("page"), title="No face found") from None
        except ValueError as e:  # no detector at all (e.g. OpenCV 5 installed): the message says what to do
            raise gr.Error(message_for(e, "page"), title="Face crop unavailable") from None

    # -- event handlers ---------------------------------------------------------------------------------

    def preview(path: str | None, face_crop: bool, whole: bool, k: int):
        """What the model will see for photo k+1, shown right after upload; problems become the status."""
        if not path:
            return None, "", gr.update(visible=False, value=False)
        try:
            _, seen, status = load_subject(k, path, face_crop, whole)
            return seen, status, gr.update(visible=whole, value=whole)
        except ImageError as e:
            return None, f"✗ {e.message_for('page')}", gr.update(visible=False)
        except NoFaceFoundError:
            status = f"✗ no face found in photo {k + 1}: tick 'Use whole photo' or try a clearer photo"
            return load_image(path, limits=limits), status, gr.update(visible=True)
        except ValueError as e:
            return None, f"✗ {message_for(e, 'page')}", gr.update(visible=True)

    def hint(prompt: str, *files: str | None) -> str:
        count = len(photos_of(list(files)))
        return prompt_hint(prompt, count, tokenizer, limits.max_subjects, limits.max_prompt_chars).text

    def check_before_queue(*values):
        """Runs before the job takes a queue slot: refuses a prompt that cannot match the photos."""
        prompt, files = values[0], values[len(settings_inputs):len(settings_inputs) + MAX_SLOTS]
        h = prompt_hint(prompt or "", len(photos_of(list(files))), tokenizer, limits.max_subjects,
                        limits.max_prompt_chars)
        return [gr.validate(h.ok, h.text)] + [gr.validate(True, "")] * (len(values) - 1)

    @gpu
    def run(pipe, request, subjects, on_step, stop):
        return generate(pipe, request, subjects=subjects, on_step=on_step, stop=stop, limits=limits)

    def generate_images(prompt, negative, alpha, guidance, steps, sampler, seed, num_images, width, height,
                        face_crop, photo_1, photo_2, photo_3, photo_4, whole_1, whole_2, whole_3, whole_4,
                        request: gr.Request, progress=gr.Progress()):  # noqa: B008 - gradio's injection idiom
        files = [photo_1, photo_2, photo_3, photo_4][:MAX_SLOTS]
        wholes = [whole_1, whole_2, whole_3, whole_4][:MAX_SLOTS]
        gen_request = GenerationRequest(
            prompt=prompt or "", images=[], negative_prompt=negative or "", alpha=alpha, guidance_scale=guidance,
            num_inference_steps=steps, num_images=num_images, height=height, width=width,
            seed=-1 if seed is None else seed, scheduler=sampler, face_crop=bool(face_crop),
        )
        # Stop works from here on: pressed while photos are decoded or cropped, nothing is generated.
        session = request.session_hash or ""
        stop = stops[session] = threading.Event()
        # 1. Cheap checks first: nothing is decoded or loaded for a request that cannot run
        photos = photos_of(files)
        try:
            gen_request.images = [None] * len(photos)  # count only; validated again with real images
            validate(gen_request, tokenizer, limits)
        except GenerationError as e:
            raise gr.Error(e.message_for("page"), title="Check the prompt and settings") from None
        # 2. Photos: safe decode, face crop (or whole photo)
        loaded = [subject_or_error(k, path, bool(face_crop), bool(wholes[k])) for k, path in photos]
        gen_request.images = [image for image, _, _ in loaded]
        subjects = [subject for _, subject, _ in loaded]
        # 3. Generate, one step at a time, honouring Stop
        started = time.monotonic()

        def on_step(done: int, total: int) -> None:
            left = (time.monotonic() - started) / done * (total - done)
            progress((done, total), desc=f"step {done}/{total} · about {left:.0f} s left")

        progress(0, desc="preparing")
        try:
            result = run(get_pipeline(), gen_request, subjects, on_step, stop)
        except GenerationError as e:
            free_memory()
            raise gr.Error(e.message_for("page"), title="Could not generate") from None
        finally:
            if stops.get(session) is stop:
                del stops[session]
        if result.interrupted:
            return gr.update(), gr.update(), "Stopped. Nothing was generated."
        status = f"{len(result.images)} image(s) · seed {result.seed}"
        if result.num_hidden:
            status += f" · {result.num_hidden} of {len(result.images)} images hidden by the safety filter"
            gr.Warning(f"{result.num_hidden} of {len(result.images)} images hidden by the safety filter")
        return result.images, result.seed, status

    def stop_generation(request: gr.Request) -> None:
        event = stops.get(request.session_hash or "")
        if event is not None:
            event.set()

    def restore(path: str | None):
        record = read_record(path) if path else None
        if record is None:
            raise gr.Error("That file holds no FastComposer settings; drop a PNG made by this app.")
        return (record.prompt, record.negative_prompt, record.alpha, record.guidance_scale,
                record.num_inference_steps, record.scheduler, record.seed, record.num_images, record.width,
                record.height, record.face_crop)

    def sampler_steps(sampler: str, steps: int) -> int:
        """Switching sampler moves the steps to that sampler's sensible default, unless customised."""
        if sampler == "dpm" and steps == d.num_inference_steps:
            return d.dpm_steps
        if sampler != "dpm" and steps == d.dpm_steps:
            return d.num_inference_steps
        return steps

    def swap(a, b, pa, pb):
        return b, a, pb, pa

    # -- layout ----------------------------------------------------------------------------------------

    with gr.Blocks(title="FastComposer Studio", delete_cache=settings.server.delete_cache) as demo:
        if banner:
            gr.Markdown(f"> ⚠ **Preview mode.** {banner}", elem_id="banner")
        gr.Markdown(HOW_TO)
        gr.Markdown(f"<small>{CONSENT}</small>", elem_id="consent")
        with gr.Row():
            with gr.Column(scale=5):
                files, previews, statuses, wholes = [], [], [], []
                with gr.Row():
                    for k in range(MAX_SLOTS):
                        with gr.Column(min_width=140):
                            files.append(gr.File(label=f"Photo {k + 1}", file_types=["image"], type="filepath",
                                                 height=110, elem_id=f"photo-{k + 1}"))
                            previews.append(gr.Image(label=f"Model sees {k + 1}", interactive=False, height=140,
                                                     show_label=False, elem_id=f"preview-{k + 1}"))
                            statuses.append(gr.Markdown(elem_id=f"status-{k + 1}"))
                            wholes.append(gr.Checkbox(label="Use whole photo", value=False, visible=False))
                with gr.Row():
                    swaps = [gr.Button(f"⇄ {k + 1}↔{k + 2}", size="sm") for k in range(MAX_SLOTS - 1)]
                face_crop = gr.Checkbox(label="Crop to the face (recommended: the model was trained on head-and-"
                                        "shoulders crops)", value=True)
                prompt = gr.Textbox(label="Prompt", lines=2, max_lines=4, elem_id="prompt",
                                    placeholder="a woman img and a man img hiking in the Alps")
                hint_box = gr.Markdown(elem_id="prompt-hint")
                alpha = gr.Slider(0.0, 1.0, value=d.alpha, step=0.05, label="Identity strength (alpha)",
                                  info="Higher: more like the photos. Lower: follows the prompt more freely.")
                num_images = gr.Slider(1, limits.max_images_per_run, value=d.num_images, step=1, label="Images")
                with gr.Accordion("Advanced settings", open=False):
                    negative = gr.Textbox(label="Negative prompt", value=d.negative_prompt, lines=2)
                    with gr.Row():
                        sampler = gr.Dropdown(SAMPLERS, value=d.scheduler, label="Sampler")
                        steps = gr.Slider(limits.min_steps, limits.max_steps, value=d.num_inference_steps, step=1,
                                          label="Steps", elem_id="steps")
                    guidance = gr.Slider(limits.min_guidance, limits.max_guidance, value=d.guidance_scale, step=0.5,
                                         label="Guidance scale")
                    with gr.Row():
                        width = gr.Slider(limits.min_side, limits.max_side, value=d.width, step=64, label="Width",
                                          elem_id="width")
                        height = gr.Slider(limits.min_side, limits.max_side, value=d.height, step=64, label="Height",
                                           elem_id="height")
                    seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)", minimum=-1,
                                     maximum=limits.max_seed)
                with gr.Row():
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
            with gr.Column(scale=4):
                gallery = gr.Gallery(label="Results", format="png", columns=2, height=520, elem_id="gallery",
                                     buttons=["download", "fullscreen"])
                with gr.Row():
                    used_seed = gr.Number(label="Seed used", interactive=False, precision=0)
                    reuse = gr.Button("♻ Reuse seed", size="sm")
                status = gr.Markdown(elem_id="status")
                restore_file = gr.File(label="Drop a PNG made here to restore its settings", file_types=[".png"],
                                       type="filepath", height=90)
        gr.Examples(
            [[p, str(ASSETS / a), str(ASSETS / b) if b else None] for p, a, b in EXAMPLES],
            inputs=[prompt, files[0], files[1]], label="Examples (public-domain photos)",
        )

        # -- wiring ----------------------------------------------------------------------------------------
        settings_inputs = [prompt, negative, alpha, guidance, steps, sampler, seed, num_images, width, height,
                           face_crop]
        for k in range(MAX_SLOTS):
            gr.on([files[k].change, wholes[k].change], lambda p, c, w, k=k: preview(p, c, w, k),
                  [files[k], face_crop, wholes[k]], [previews[k], statuses[k], wholes[k]],
                  api_name=f"preview_{k + 1}", api_visibility="undocumented")
        face_crop.change(lambda c, *fw: [x for k in range(MAX_SLOTS) for x in preview(fw[k], c, fw[MAX_SLOTS + k], k)],
                         [face_crop, *files, *wholes],
                         [x for k in range(MAX_SLOTS) for x in (previews[k], statuses[k], wholes[k])],
                         api_name="preview_all", api_visibility="undocumented")
        gr.on([prompt.change, *(f.change for f in files)], hint, [prompt, *files], hint_box, api_name="hint",
              queue=False)
        for k, button in enumerate(swaps):
            button.click(swap, [files[k], files[k + 1], wholes[k], wholes[k + 1]],
                         [files[k], files[k + 1], wholes[k], wholes[k + 1]], api_name=f"swap_{k + 1}",
                         api_visibility="undocumented")
        sampler.change(sampler_steps, [sampler, steps], steps, api_name="sampler_steps", api_visibility="undocumented")
        gen_inputs = [*settings_inputs, *files, *wholes]
        gen_event = go.click(generate_images, gen_inputs, [gallery, used_seed, status], api_name="generate",
                             concurrency_id=settings.server.concurrency_id, concurrency_limit=1,
                             validator=check_before_queue)
        prompt.submit(generate_images, gen_inputs, [gallery, used_seed, status], api_name="generate_on_enter",
                      api_visibility="undocumented", concurrency_id=settings.server.concurrency_id,
                      concurrency_limit=1, validator=check_before_queue)
        stop_btn.click(stop_generation, None, None, cancels=[gen_event], queue=False, api_name="stop")
        reuse.click(lambda s: s if s is not None else -1, used_seed, seed, api_name="reuse_seed",
                    api_visibility="undocumented")
        restore_file.upload(restore, restore_file, settings_inputs, api_name="restore_settings")
    return demo


# -- start-up --------------------------------------------------------------------------------------------

def load_or_preview(args: argparse.Namespace) -> tuple[object, str | None]:
    """The real pipeline, or the tiny preview model plus a banner that says why and how to fix it."""
    from fastcomposer.checkpoint import CheckpointError
    from fastcomposer.loader import load_pipeline
    from fastcomposer.messages import message_for
    from fastcomposer.weights import WeightsUnavailableError

    safety = not (args.no_safety_checker or os.environ.get("FASTCOMPOSER_DISABLE_SAFETY") == "1")
    if not safety:
        logger.warning("the safety checker is turned off (--no-safety-checker / FASTCOMPOSER_DISABLE_SAFETY=1)")
    common = dict(device=args.device, dtype=args.dtype)
    if args.weights == "tiny":
        return load_pipeline("tiny", safety_checker=False, **common), (
            "Running on tiny random weights (--weights tiny): images are noise. Start without --weights tiny to "
            "use the real model.")
    try:
        return load_pipeline(args.weights, safety_checker=safety, compile=args.compile, **common), None
    except (WeightsUnavailableError, CheckpointError) as e:
        logger.error("real weights unavailable: %s", e)
        reason = message_for(e, "page")  # the page's wording: no paths on a page
    # The reason names what is missing (the checkpoint or the safety checker) and how to supply it.
    return load_pipeline("tiny", safety_checker=False, **common), (
        f"The real model could not be loaded, so this page runs on tiny random weights and images are noise. "
        f"Why, and how to fix it: {reason}")


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(description="FastComposer Studio web app")
    p.add_argument("--weights", default=env("FASTCOMPOSER_WEIGHTS"), metavar="PATH|tiny",
                   help="checkpoint file or converted folder; 'tiny' for a preview (default: download) "
                   "[FASTCOMPOSER_WEIGHTS]")
    p.add_argument("--device", default=env("FASTCOMPOSER_DEVICE", "auto"), choices=["auto", "cpu", "cuda", "mps"],
                   help="[FASTCOMPOSER_DEVICE]")
    p.add_argument("--dtype", default=env("FASTCOMPOSER_DTYPE", "auto"), choices=["auto", "fp32", "fp16", "bf16"],
                   help="[FASTCOMPOSER_DTYPE]")
    p.add_argument("--host", default=env("GRADIO_SERVER_NAME", "127.0.0.1"), help="address to listen on")
    p.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT", "7860")), help="port")
    p.add_argument("--share", action="store_true", help="also make a temporary public gradio.live link")
    p.add_argument("--public", action="store_true", default=bool(env("SPACE_ID")) or env("FASTCOMPOSER_PUBLIC") == "1",
                   help="public-server mode: listen on 0.0.0.0, hide internal errors [FASTCOMPOSER_PUBLIC=1]")
    p.add_argument("--compile", action="store_true", default=env("FASTCOMPOSER_COMPILE") == "1",
                   help="CUDA only: compile the UNet (about a minute of warm-up per image size, then ~3x faster "
                   "steps at one image) [FASTCOMPOSER_COMPILE=1]")
    p.add_argument("--no-safety-checker", action="store_true",
                   help="do not filter images (logs a warning) [FASTCOMPOSER_DISABLE_SAFETY=1]")
    return p


def launch(demo: gr.Blocks, args: argparse.Namespace, settings: Settings = SETTINGS, **kwargs) -> None:
    """Queue and serve `demo` with the limits in `settings` (see README, "Limits and safety")."""
    from fastcomposer.weights import cache_dir

    server = settings.server
    demo.queue(max_size=server.queue_max_size, default_concurrency_limit=1, api_open=False)
    blocked = [str(cache_dir()), str(Path.home() / ".cache" / "huggingface"), str(ROOT / "fastcomposer"),
               str(ROOT / "app.py")]
    if args.weights and args.weights != "tiny":
        blocked.append(str(Path(args.weights).expanduser().resolve()))
    demo.launch(
        server_name="0.0.0.0" if args.public and args.host == "127.0.0.1" else args.host,
        server_port=args.port,
        share=args.share,
        show_error=not args.public,  # public: only gr.Error messages reach users, never tracebacks
        max_file_size=settings.limits.max_file_size,
        allowed_paths=[str(ASSETS), *kwargs.pop("allowed_paths", [])],  # extra ones only for tests
        blocked_paths=blocked,
        **kwargs,
    )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args()
    pipe, banner = load_or_preview(args)
    launch(create_demo(lambda: pipe, banner), args)


if __name__ == "__main__":
    main()
