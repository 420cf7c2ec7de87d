"""The paper's evaluation protocol on your own cases: identity preservation and prompt consistency.

- `runner`: `evaluate`, over cases, prompts, seeds and alphas, with one model load;
- `report`: the averages, the markdown table and the contact sheet.

May import: everything below it (`generation` and lower); never `ui` or `commands`.
"""

import lazy_loader

# Public names, by the module that defines them; imported on first use, so importing the package stays cheap.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "runner": ["EvaluationError", "EvaluationSettings", "evaluate"],
    },
)
