"""Whose face is in an image: face embeddings, matching faces to subjects, the identity report.

- `report`: `SubjectIdentity` and `IdentityReport`, what a check says per subject;
- `matching`: pairing faces with subjects (the optimal assignment) and the "blended" flags;
- `arcface`: ArcFace weights, face alignment to its template;
- `checker`: `IdentityChecker`, detection + alignment + embedding + matching for whole images.

May import: the shared floor, `inputs`, `models` and `pipeline`.
"""

import lazy_loader

# Public names, by the module that defines them; imported on first use, so importing the package stays cheap.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "checker": ["IdentityChecker", "default_checker"],
        "report": ["IdentityReport", "SubjectIdentity"],
        "matching": ["match_faces", "subject_names"],
    },
)
