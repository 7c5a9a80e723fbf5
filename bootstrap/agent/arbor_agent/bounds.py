"""Every bound of the agent: its queues, caches, buffers and timeouts."""




# Largest request body (e.g. a module's stdin) gathered from a stream.
BODY_BYTES_MAX = 256 * 1024 * 1024


# Frames buffered while a command runs, before the link counts as abused.
PENDING_BYTES_MAX = 64 * 1024 * 1024


# Longest wait for a pipe's command to exit once its outputs are closed.
PIPE_EXIT_WAIT_S = 5


# Log lines kept for the next reply.
LOG_LINES_MAX = 64


# Nested agents (become) one agent may route for.
CHILDREN_MAX = 64


# Temp dirs the sweeper holds before it forgets those already gone.
SWEEP_PATHS_MAX = 4096


# Frames queued toward one nested agent before the link is read no more.
CHILD_QUEUE_BYTES_MAX = 8 * 1024 * 1024


# Longest wait for a become command's prompt or success.
BECOME_TIMEOUT_S_MAX = 600


# Output of a become command kept for its error message.
BECOME_OUTPUT_MAX = 4096


# Most bytes of module_utils sources kept in memory for warm imports.
WARM_BYTES_MAX = 64 * 1024 * 1024


# Most bytes of module zips (their AnsiballZ literal, decoded) kept for this run.
ZIP_CACHE_BYTES_MAX = 64 * 1024 * 1024


# Most bytes of zip members (as stored) kept for rebuilding module zips.
MEMBER_BYTES_MAX = 64 * 1024 * 1024


# Most bytes of module source whose compiled code is kept.
CODE_CACHE_BYTES_MAX = 64 * 1024 * 1024


WRAPPERS_MAX = 16


# Most module scripts remembered as not written (their zip was gone).
PUT_MISSED_MAX = 256


# Largest module script run from a file in this interpreter.
MODULE_FILE_BYTES_MAX = 64 * 1024 * 1024


# Modules waiting for the in-process one to end (the agent never forks while
# a module's thread runs: the fork would inherit locks the thread holds).
MODULES_WAITING_MAX = 256

# Forwards (arbor_forward) one agent listens on at once, and connections
# open through each: past them, a listen is refused, a connection closed.
FORWARDS_MAX = 64
FORWARD_CONNS_MAX = 256
# What a forwarded connection sends the daemon beyond what the daemon has
# written out (its credit): a slow end on the controller holds its own
# connection only.
FORWARD_WINDOW_BYTES = 1024 * 1024
