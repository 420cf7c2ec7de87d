"""The model and its weights: networks, configs, checkpoints, weight sources, LoRAs.

- `architecture`: the SD1.5 and CLIP ViT-L/14 configs that ship in the package, and the networks built from them;
- `checkpoint`: reading the released checkpoint (safetensors, or pickles with `weights_only=True`) strictly;
- `weights`: where weights come from (a path, the converted cache, the Hub, tiny random ones);
- `postfuse`: FastComposer's post-fuse MLP and the subject image encoder's preprocessing;
- `lora`, `lora_files`: Stable Diffusion 1.5 LoRAs, checked against the model before loading;
- `testing`: tiny released-layout checkpoints and model folders for tests and benchmarks.

May import: the shared floor and `inputs`.
"""

import lazy_loader

# Public names, by the module that defines them; imported on first use, so importing the package stays cheap.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "postfuse": ["PostfuseModule"],
        "lora": ["LoraSpec", "apply_loras", "parse_lora_spec"],
        "weights": ["resolve_weights"],
        "checkpoint": ["read_state_dict"],
    },
)
