"""Results: what a query hands back and writes.

``result`` (one image's heat maps), ``resultset`` (a table over many images),
``overlay`` (the PNG drawn over the image), ``output`` (INTO files: PNG, .npy,
Parquet), ``preview`` (a heat map in the terminal).
"""
