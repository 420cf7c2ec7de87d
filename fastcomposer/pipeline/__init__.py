"""The pipeline and what plugs into its denoising loop.

- `pipeline_fastcomposer`: `FastComposerPipeline`, Stable Diffusion 1.5 with delayed subject conditioning;
- `checks`, `output`: the call's argument checks and its output;
- `denoising`: the loop's plan (delayed conditioning) and its add-ons, attached for one call;
- `subjects`: the subject photos through the image encoder (cached) and into the prompt;
- `mmagic`: OpenMMLab mmagic's `infer` and `special_tokenizer`, for code written against it;
- `schedulers`, `presets`: samplers, and named bundles of sampler, steps and caching;
- `caching`: DeepCache feature caching; `attention`: per-subject attention capture and overlays;
- `previews`: cheap latent previews;
- `devices`, `loading`: device and precision choice; `load_pipeline`.

May import: the shared floor, `inputs` and `models`.
"""

import lazy_loader

# Public names, by the module that defines them; imported on first use, so importing the package stays cheap.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "pipeline_fastcomposer": ["FastComposerPipeline"],
        "output": ["FastComposerPipelineOutput", "placeholder_image"],
        "subjects": ["SubjectImages", "subject_groups"],
        "loading": ["load_pipeline"],
    },
)
