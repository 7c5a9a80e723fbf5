# arbor stage-0: run over ssh as `sh -c <this> arbor-stage0 SIZE NODE`.
# Reads exactly SIZE bytes (the relay binary) from stdin into an anonymous
# in-RAM file and runs it from there; the frames that follow stay unread.
# Writes nothing to disk. Loaders, in order:
#   1. memfd_create via perl (perl-base is Essential on Debian and Ubuntu)
#   2. memfd_create via python3
#   3. a file in /dev/shm (RAM), unlinked before a byte is written, run via
#      /proc/self/fd (for hosts with neither perl nor python)
# Each reports its name on stderr as "arbor-stage0: loader=NAME" when
# ARBOR_STAGE0_VERBOSE is set; ARBOR_STAGE0_LOADER=perl|python|shm forces one.
n=$1
node=$2
case $(uname -m) in
    x86_64) nr=319 ;;
    aarch64) nr=279 ;;
    *) echo "arbor-stage0: unsupported machine $(uname -m)" >&2; exit 70 ;;
esac
want=${ARBOR_STAGE0_LOADER:-any}
if [ "$want" = any -o "$want" = perl ] && command -v perl >/dev/null 2>&1; then
    exec perl -e '
        my ($n, $node, $nr) = @ARGV;
        my $name = "arbor-relay";
        my $fd = syscall($nr + 0, $name, 1);
        die "arbor-stage0: memfd_create: $!\n" if $fd < 0;
        open(my $out, ">&=", $fd) or die "arbor-stage0: fdopen: $!\n";
        my ($left, $buf) = ($n, "");
        while ($left > 0) {
            my $r = sysread(STDIN, $buf, $left > 65536 ? 65536 : $left);
            die "arbor-stage0: stdin closed after " . ($n - $left) . " of $n bytes\n" unless $r;
            my $off = 0;
            while ($off < $r) {
                my $w = syswrite($out, $buf, $r - $off, $off);
                die "arbor-stage0: write: $!\n" unless defined $w;
                $off += $w;
            }
            $left -= $r;
        }
        print STDERR "arbor-stage0: loader=perl-memfd\n" if $ENV{ARBOR_STAGE0_VERBOSE};
        exec {"/proc/self/fd/$fd"} "arbor-relay", "--node", $node
            or die "arbor-stage0: exec: $!\n";
    ' "$n" "$node" "$nr"
fi
for py in python3 python; do
    if [ "$want" = any -o "$want" = python ] && command -v $py >/dev/null 2>&1; then
        exec $py -c '
import os, sys
n, node = int(sys.argv[1]), sys.argv[2]
fd = os.memfd_create("arbor-relay", 0)
left = n
while left:
    b = os.read(0, min(left, 65536))
    if not b:
        sys.exit("arbor-stage0: stdin closed after %d of %d bytes" % (n - left, n))
    os.write(fd, b)
    left -= len(b)
if os.environ.get("ARBOR_STAGE0_VERBOSE"):
    sys.stderr.write("arbor-stage0: loader=python-memfd\n")
os.execv("/proc/self/fd/%d" % fd, ["arbor-relay", "--node", node])
' "$n" "$node"
    fi
done
if [ "$want" != any -a "$want" != shm ]; then
    echo "arbor-stage0: loader $want not available" >&2
    exit 70
fi
# Neither perl nor python: a RAM file with no name by the time it is filled.
t=$(mktemp /dev/shm/.arbor-relay.XXXXXX) || exit 70
exec 3>"$t" 4<"$t"
rm -f "$t"
chmod 700 /proc/self/fd/3 2>/dev/null
head -c "$n" >&3
exec 3>&-
[ -n "$ARBOR_STAGE0_VERBOSE" ] && echo "arbor-stage0: loader=shm-unlinked" >&2
exec /proc/self/fd/4 --node "$node"
