"""openseek-cpt: continued pretraining of OpenSeek-style models, data -> train -> soup."""

__version__ = "0.1.0"
