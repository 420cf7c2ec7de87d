"""The MCP tool: "put these people into this scene", for AI assistants (Claude, Cursor, ChatGPT, ...).

Gradio serves every public API endpoint of a page as an MCP tool when it is launched with `mcp_server=True`, with
the function's docstring as the tool's description. This module adds one endpoint made for agents, `compose`:
photos as URLs or data URIs (fetched by `inputs/remote.py`'s rules), plain settings, and the images back as images
(four image outputs: MCP clients receive images as images, where a gallery would reach them as text). The page's
own endpoint, `/generate`, stays for `gradio_client` users but is not offered as a tool: its gallery inputs are made
for the page. The page's helper events are private (not tools, not on the API page).

The run goes through the same checks, queue slot (`concurrency_id`) and GPU path (`gpu.run_generation`, ZeroGPU-
safe) as Generate; its errors reach the client as tool errors in the Python wording.
"""

from __future__ import annotations

import re
import warnings

import gradio as gr

from ..config import SETTINGS
from ..pipeline.presets import PRESETS

MAX_TOOL_IMAGES = SETTINGS.limits.max_images_per_run  # one image output each: MCP clients get images as images
PRIVATE_URLS_ENV = "FASTCOMPOSER_ALLOW_PRIVATE_URLS"


# The tool's description, as the MCP server reads a docstring: the description first, then one line per parameter
# ("name: text"; Gradio's parser keeps the first line of each), then the returns. Built line by line for that.
COMPOSE_DOC = "\n".join([
    "Generate pictures of one to four specific people in a scene you describe (FastComposer: no fine-tuning, one "
    "pass). Write the prompt as an image caption and put the word `img` right after the word for each person, e.g. "
    '"a man img and a woman img hiking in the Alps": the 1st `img` is the person in subject_1_photos, the 2nd the '
    "person in subject_2_photos, and so on. Give exactly one `img` per subject that has photos, in the same order. "
    "Errors name the problem and the fix: a prompt whose `img` count differs from the number of subjects with "
    "photos, a photo URL that is refused (only public http(s) addresses are fetched on a public server; at most 10 "
    "MB; a few seconds to answer), a file that is not a photo, no face found in a photo, or a setting out of range.",
    "",
    "Args:",
    '    prompt: the scene, with `img` after each person\'s word (1 to 4 of them), e.g. "a woman img reading in a '
    'cafe" or "a man img and a woman img sitting in a park"; at most 1000 characters.',
    "    subject_1_photos: the person of the 1st `img`: one to four photos, as http(s) URLs or data:image/...;base64 "
    "URIs, separated by spaces or new lines. A clear face works best; several photos of one person are averaged.",
    "    subject_2_photos: the person of the 2nd `img`, the same way; empty when the prompt has one `img`.",
    "    subject_3_photos: the person of the 3rd `img`; empty when there are fewer.",
    "    subject_4_photos: the person of the 4th `img`; empty when there are fewer.",
    "    seed: -1 for a random seed, or a whole number from 0 to 2147483647 to get the same picture again.",
    '    preset: "fast" (fewest steps), "balanced", or "original" (the paper\'s 50 steps: the slowest).',
    "    alpha: identity strength from 0 to 1 (default 0.75): higher looks more like the photos, lower follows the "
    "prompt more freely.",
    "    num_images: how many pictures, 1 to 4.",
    '    layout_boxes: optional, where each person goes: "x0,y0,x1,y1" fractions of width and height per person in '
    '`img` order, separated by "|", "-" for a person left free; e.g. "0,0,0.5,1 | 0.5,0,1,1" puts the 1st person on '
    "the left half and the 2nd on the right. Empty: the prompt decides.",
    "",
    "Returns:",
    "    image_1 to image_4: the pictures (the slots past num_images are empty); then a text with the seed and the "
    "settings used (give the seed back to get the same picture).",
])


class ToolHandler:
    """`compose` for one page: its engine key, GPU runner and limits (see page.py)."""

    def __init__(self, *, key: str, runner, settings, allow_private: bool = False):
        self.key, self.runner, self.settings, self.allow_private = key, runner, settings, allow_private

    def __call__(self, prompt, subject_1_photos, subject_2_photos, subject_3_photos, subject_4_photos, seed,
                 preset, alpha, num_images, layout_boxes, progress=gr.Progress()):  # noqa: B008 - gradio's idiom
        from ..messages import UserFacingError, message_for

        try:
            request, subjects = self.prepare(prompt, [subject_1_photos, subject_2_photos, subject_3_photos,
                                                      subject_4_photos], seed, preset, alpha, num_images,
                                             layout_boxes)
        except (UserFacingError, ValueError) as e:
            raise gr.Error(message_for(e, "api"), title="Check the request") from None
        result = self.run(request, subjects, progress)
        images = list(result.images)[:MAX_TOOL_IMAGES]
        summary = (f"{len(images)} image(s) · seed {result.seed} · preset {request.preset or 'custom'} "
                   f"({request.scheduler}, {request.num_inference_steps} steps) · alpha {request.alpha:g} · "
                   f"{request.width}x{request.height}")
        if request.boxes:
            summary += f" · layout {layout_boxes.strip()}"
        if result.num_hidden:
            summary += f" · {result.num_hidden} hidden by the safety filter"
        return (*images, *[None] * (MAX_TOOL_IMAGES - len(images)), summary)

    def prepare(self, prompt, photo_fields, seed, preset, alpha, num_images, layout_boxes):
        """The checked request and the cropped subjects; `UserFacingError`/`ValueError` for anything wrong."""
        from ..generation.request import GenerationRequest, seed_of, validate
        from ..generation.run import prepare_subjects
        from ..inputs.prompt import load_tokenizer
        from ..inputs.remote import FetchPolicy, photo_from
        from ..pipeline.boxes import parse_boxes_text
        from ..pipeline.presets import get_preset

        plan = get_preset(preset or "fast")
        sources = [[s for s in re.split(r"\s+", (field or "").strip()) if s] for field in photo_fields]
        while sources and not sources[-1]:
            sources.pop()
        if any(not group for group in sources):
            raise ValueError("a subject between others has no photos; give subject_k_photos for every `img`, in "
                             "order")
        request = GenerationRequest(
            prompt=prompt or "", images=[[None] * len(group) for group in sources], alpha=alpha,
            num_inference_steps=plan.num_inference_steps, scheduler=plan.scheduler,
            cache_interval=plan.cache_interval, preset=plan.name, num_images=num_images,
            seed=-1 if seed is None else seed, boxes=parse_boxes_text(layout_boxes),
        )
        validate(request, load_tokenizer(), self.settings.limits)  # before any photo is fetched
        policy = FetchPolicy(allow_private=self.allow_private)
        photos = [[photo_from(source, policy, f"photo {j + 1} of subject {k + 1}") for j, source in enumerate(group)]
                  for k, group in enumerate(sources)]
        request.images = photos
        request.num_images, request.seed = int(num_images), seed_of(int(request.seed), self.settings.limits)
        return request, prepare_subjects(photos, face_crop=True)

    def run(self, request, subjects, progress):
        """The run on the GPU path, its steps on the progress bar; the `GenerationResult`."""
        from contextlib import closing

        from ..generation.streaming import ResultEvent, StepEvent
        from .gpu import Failed

        progress(0, desc="starting")
        with closing(self.runner(self.key, request, subjects, [], None)) as events:
            for event in events:
                if isinstance(event, Failed):
                    raise gr.Error(event.message, title=event.title)
                if isinstance(event, StepEvent):
                    label = f"{event.stage} · " if event.stage else ""
                    progress((event.done, event.total), unit="steps", desc=f"{label}step {event.done}/{event.total}")
                elif isinstance(event, ResultEvent):
                    return event.result
        raise gr.Error("the run ended without a result; try again")


def return_every_output() -> None:
    """Make a tool call without a progress token return each output of a several-output tool, as one with does.

    Gradio 6.31's MCP server, called without a progress token (as many clients call), wraps the endpoint's whole
    result in one list (`_execute_tool_without_progress` returns `[job.result()]`), so the tuple of this tool's
    five outputs reached the client as one text of Python reprs instead of four images and a text; with a token it
    returns the outputs one by one. This puts the outputs of a tuple result one by one too. Idempotent.
    """
    from anyio.to_thread import run_sync
    from gradio.mcp import GradioMCPServer

    # Gradio warns about gr.State inputs for every public endpoint, tools or not; the one State-taking endpoint is
    # the page's /generate, which `not_a_tool` keeps off the tool list, so the warning would only mislead.
    warnings.filterwarnings("ignore", message="This MCP server includes a tool that has a gr.State input",
                            category=UserWarning, module="gradio.mcp")
    if getattr(GradioMCPServer._execute_tool_without_progress, "_every_output", False):
        return

    async def without_progress(self, job) -> list:
        result = await run_sync(job.result)
        return list(result) if isinstance(result, tuple) else [result]  # gradio_client: a tuple for several

    without_progress._every_output = True
    GradioMCPServer._execute_tool_without_progress = without_progress


def skip_empty_outputs() -> None:
    """Leave the image slots past `num_images` out of a tool's result, instead of a text "None" for each.

    Gradio 6.31's MCP server turns every output into content, an empty one into the text "None"; a model reading
    "None" twice after its pictures may take it for a failure. Idempotent.
    """
    from gradio.mcp import GradioMCPServer

    postprocess = GradioMCPServer.postprocess_output_data
    if getattr(postprocess, "_skips_empty", False):
        return

    def without_empty(self, data, root_url):
        return postprocess(self, [output for output in data if output is not None], root_url)

    without_empty._skips_empty = True
    GradioMCPServer.postprocess_output_data = without_empty


def not_a_tool(fn):
    """`fn` as an API endpoint that the MCP server does not offer as a tool.

    Gradio 6.31 offers every public endpoint as a tool, except functions whose `_mcp_type` (set by its
    `gr.mcp.resource` and `gr.mcp.prompt` decorators) is not "tool". The page's /generate must stay public for
    `gradio_client` users; marked here, it is no tool (tests/test_mcp.py checks that the tool list is `compose`).
    """
    import functools

    @functools.wraps(fn)  # Gradio reads the signature through it: gr.Request and gr.Progress are still injected
    def endpoint(*args, **kwargs):
        yield from fn(*args, **kwargs)

    endpoint._mcp_type = "page"
    return endpoint


def build_tool(handler: ToolHandler, concurrency_id: str) -> None:
    """The tool's hidden components and its event, `/compose` (inside the page's Blocks)."""
    with gr.Column(visible=False, elem_id="mcp-tool"):
        prompt = gr.Textbox(label="prompt")
        photos = [gr.Textbox(None if k == 1 else "", label=f"subject_{k}_photos") for k in range(1, 5)]
        seed = gr.Number(-1, label="seed")
        preset = gr.Dropdown(list(PRESETS), value="fast", label="preset")
        alpha = gr.Number(SETTINGS.defaults.alpha, label="alpha")
        num_images = gr.Number(1, label="num_images")
        boxes = gr.Textbox("", label="layout_boxes")
        images = [gr.Image(type="pil", format="png", label=f"image_{k}") for k in range(1, MAX_TOOL_IMAGES + 1)]
        summary = gr.Textbox(label="settings")
        trigger = gr.Button("compose")

    def compose(prompt: str, subject_1_photos: str, subject_2_photos: str = "", subject_3_photos: str = "",
                subject_4_photos: str = "", seed: float = -1, preset: str = "fast", alpha: float = 0.75,
                num_images: float = 1, layout_boxes: str = "", progress=gr.Progress()):  # noqa: B008
        return handler(prompt, subject_1_photos, subject_2_photos, subject_3_photos, subject_4_photos, seed, preset,
                       alpha, num_images, layout_boxes, progress)

    compose.__doc__ = COMPOSE_DOC  # the tool's description and its parameters', as the MCP server reads them
    trigger.click(compose, [prompt, *photos, seed, preset, alpha, num_images, boxes], [*images, summary],
                  api_name="compose", concurrency_id=concurrency_id, concurrency_limit=1)
