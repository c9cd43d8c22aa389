"""App-side helpers of the SoftPatch Streamlit app: session state, caching, widgets, plots, reports.

Nothing algorithmic lives here: the core (``softpatch``) computes, these modules only gather
values, keep per-session state and draw.
"""

from softpatch.runtime.threads import prefer_passive_waiting

# The app's first import of this package comes before any module that loads torch or faiss: the moment
# their OpenMP runtimes read the waiting policy (see softpatch.runtime.threads).
prefer_passive_waiting()
