"""`conceptkit implant`: learn a new word for a concept from a few images (textual inversion,
Gal et al. 2022), so that Picasso can take apart what the model learned (docs/implant.md)."""
