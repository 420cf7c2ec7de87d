"""Inputs: what a user gives, made safe and ready for the model.

- `images`: safe image loading (size caps, EXIF, colour modes, decompression bombs);
- `faces`: face detection and the square crops the image encoder was trained on;
- `face_detectors`: the detectors behind `faces` (RetinaFace, OpenCV's Haar cascades);
- `prompt`: `img` markers, the text-only prompt and each subject's token position.

May import: the shared floor (`config`, `messages`, `downloads`) only.
"""

import lazy_loader

# Public names, by the module that defines them; imported on first use, so importing the package stays cheap.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "images": ["ImageError", "load_image"],
        "faces": ["FaceCrop", "FaceCropper", "NoFaceFoundError", "crop_subject"],
        "prompt": ["ParsedPrompt", "load_tokenizer", "parse_prompt"],
    },
)
