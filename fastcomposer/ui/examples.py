"""The Examples table: one column per subject, and on a Space with the real weights, results cached at first click.

Why the table is built this way: Gradio 6.31 draws a Gallery's example cell as a block that the table cannot hold,
so with the photo galleries as the table's columns, subject 2's photo fell under "Photos of subject 1" and the
second column stayed empty. The table therefore shows one hidden `gr.Image` per subject (an image cell sits in its
column), and the galleries are hidden columns of the same examples (`visible_columns`): a click fills the prompt
and both galleries, and clears a gallery the example leaves empty.

Caching: a visitor of a Space who clicks an example gets its stored result at once (`cache_mode="lazy"`: made on the
first click, by anyone, then kept). Only with the real weights: a preview's random-weight pictures are not worth
keeping, and never on a local run, where nobody else would use them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gradio as gr

from .texts import EXAMPLES

logger = logging.getLogger(__name__)

EXAMPLE_SEED = 42  # fixed, so a cached example is what anyone gets with the same settings and this seed
EXAMPLE_SUBJECTS = 2  # the most subjects an example has (texts.EXAMPLES)


class ExampleRun:
    """A cached example's run: the example's prompt and photos with the page's defaults and `EXAMPLE_SEED`."""

    def __init__(self, *, tool, loader, preset: str, detail_faces: bool):
        self.tool, self.loader = tool, loader  # an mcp.ToolHandler (its run: the GPU path) and the page's photo loader
        self.preset, self.detail_faces = preset, detail_faces

    def __call__(self, prompt, photo_1, photo_2, gallery_1, gallery_2, progress=gr.Progress()):  # noqa: B008
        from ..generation.request import GenerationRequest
        from ..pipeline.presets import get_preset
        from .insight import result_items, result_status

        plan = get_preset(self.preset)
        photos = [p for p in (photo_1, photo_2) if p]
        subjects = [self.loader.for_generation(k, [path], True, [], None) for k, path in enumerate(photos)]
        request = GenerationRequest(prompt=prompt, images=subjects, seed=EXAMPLE_SEED, preset=plan.name,
                                    scheduler=plan.scheduler, num_inference_steps=plan.num_inference_steps,
                                    cache_interval=plan.cache_interval, detail_faces=self.detail_faces)
        result = self.tool.run(request, subjects, progress)
        return result_items([result], None), result.seed, result_status([result], None)


def build_examples(assets: Path, prompt: gr.Textbox, galleries: list[gr.Gallery], *, cached_run: ExampleRun | None,
                   outputs: list | None, concurrency_id: str) -> gr.Examples:
    """The table (inside a Blocks context). With `cached_run`, clicks show its cached `outputs` (lazily made), and
    the run that makes them waits its turn with the page's runs (`concurrency_id`): one pipeline, one run at once."""
    with gr.Column(visible=False):
        shown = [gr.Image(type="filepath", label=f"Subject {k + 1}", elem_id=f"example-photo-{k + 1}")
                 for k in range(EXAMPLE_SUBJECTS)]
    rows = []
    for text, *names in EXAMPLES:
        paths = [str(assets / name) if name else None for name in names]
        rows.append([text, *paths, *[[p] if p else None for p in paths]])
    cache = cached_run is not None
    if cache:
        logger.info("examples: results cached at first click")
    examples = gr.Examples(rows, inputs=[prompt, *shown, *galleries[:EXAMPLE_SUBJECTS]],
                           visible_columns=list(range(1 + EXAMPLE_SUBJECTS)), label="Examples (public-domain photos)",
                           elem_id="examples", fn=cached_run, outputs=outputs if cache else None,
                           cache_examples=cache, cache_mode="lazy" if cache else None)
    if cache:  # Gradio makes the event that runs (or reads) the cache; it takes no concurrency settings, so set here
        event = examples.root_block.fns[examples.cache_event["id"]]
        event.concurrency_id, event.concurrency_limit = concurrency_id, 1
    return examples
