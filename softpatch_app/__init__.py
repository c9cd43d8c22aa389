"""App-side helpers of the SoftPatch Streamlit app: session state, caching, widgets, plots, reports.

Nothing algorithmic lives here: the core (``softpatch``) computes, these modules only gather
values, keep per-session state and draw.
"""
