"""arbor agent: one persistent interpreter per (host, account) on a target.

Sent by the first stage (first_stage.py) over the ssh channel, as one
payload that bootstrap bundles from this package (its modules and
bundle_loader.py), and run from memory: nothing of it is written to
disk. It speaks arbor frames on fd 0 and fd 1 (layout: relay/wire/src/lib.rs; golden frames: tests/golden/).
Payloads are a JSON object plus a binary blob (relay/wire/src/msg.rs).

Standard library only, Python 3.6 and later.

Requests (JSON "op"):
  exec   {"cmd", "cwd"?}, blob: stdin      -> {"rc", "stdout_len"}, blob: stdout + stderr
         with "zip_key" and "zip_span": [a, b]: keep stdin[a:b] (a module's
         zip literal) under that key; with "zip_key" and "zip_at": n: the
         kept literal goes back in at offset n ({"zip_miss": true} if gone)
  put    {"path", "size", "mode"?}, blob: first bytes; then Data frames and End
                                           -> {"size"}
  fetch  {"path"}                          -> {"size"}, blob: first bytes; then Data, End
  stat   {"path", "follow", "checksum"}    -> {"stat": what the stat module says,
                                              less mime type and attributes}
  mkdtemp {"base", "name"}                 -> {"path"}: base/arbor-<pid>/name, 0700;
                                              base/arbor-<pid> is this agent's own
                                              temp dir, removed when it exits
  rmtree {"path"}                          -> {}
  chmod  {"paths", "mode"}                 -> {}: mode one symbolic clause, e.g. u+rwx
  sync   {}                                -> {}, or what failed unanswered
  ping   {}                                -> {"pid", "served"}
  become {"node", "cmd", "success", "timeout_s"}
                                           -> {"node", "pid"}: runs cmd (a become
         plugin's command around the agent's own start command) with a pty
         as its controlling terminal; each output it prints before the
         success marker goes to the caller as Data {"output"}; the caller
         may answer with Data {"password"} or {"abort"}. A password line
         goes to both the terminal (sudo, doas) and stdin (su, sudo -S):
         whichever the program reads; the pty's copy is flushed and the
         first stage skips stdin's. On success the nested agent gets this
         agent's own code, and its frames are routed through here.
  unbecome {"node"}                        -> {}: ends that nested agent (EOF)
  choose {"path", "checksum", "split", "same": exec request, "differs": exec request},
         blob: same's stdin[:split] + differs' stdin -> {"stat", "branch", "rc",
         "stdout_len"}: stats path (no follow) and runs "same" if its sha1 is
         checksum, else "differs"; only {"stat"} if path is a directory
         (copy's stat and module in one round trip)
  pipe   {"cmd"}                           -> {"streamed": true} at once; then
         the command's stdout and stderr as Data {"fd": 1|2} + bytes, as
         they come, and Data {"rc"} and End when it ends. Data frames to
         the stream are its stdin; End closes it. (rsync --rsh, tunnelled.)
Errors come back as {"error": message}. Any reply may carry "log": what
the agent logged since its last reply (shown by the glue at -vvv).
A request with "noreply": true is answered only if it fails, and then not
at once: its error is the answer to the next request that is answered, so
a task's steps can be sent without waiting for each (rmtree only logs).
A request whose JSON has "streamed": true continues in Data frames and an
End; so does a reply (its blob is then only the first part).
"""
