"""CUT / RMU (Li et al. 2024, the WMDP paper): representation misdirection."""
