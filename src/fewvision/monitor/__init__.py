"""Watching a line: conformal p-values of each image's score against the model's calibration scores, a conformal
test martingale over them (a drift alarm whose false-alarm probability is at most ``delta``), and an EWMA control
chart with the Nelson rules for the SPC-minded."""
