# arbor stage-0: run over ssh as `sh -c <this> arbor-stage0 SIZE NODE MACHINE`.
# Reads exactly SIZE bytes (the relay binary, built for MACHINE) from stdin
# into an anonymous in-RAM file and runs it from there; the frames that
# follow stay unread. If this host is another machine, it skips those
# bytes, prints `ARBOR-STAGE0 MACHINE <its machine>` on stdout, and reads
# a line with the size of its own machine's relay, then that relay.
# Writes nothing to disk. Loaders, in order:
#   1. memfd_create via perl (perl-base is Essential on Debian and Ubuntu)
#   2. memfd_create via python3
#   3. a file in /dev/shm (RAM), unlinked before a byte is written, run via
#      /proc/self/fd (for hosts with neither perl nor python)
# Each reports its name on stderr as "arbor-stage0: loader=NAME" when
# ARBOR_STAGE0_VERBOSE is set; ARBOR_STAGE0_LOADER=perl|python|shm forces one.
n=$1
node=$2
sent=${3:-x86_64}
machine=$(uname -m)
case $machine in
    x86_64|amd64) m=x86_64 ;;
    aarch64|arm64) m=aarch64 ;;
    *) echo "arbor-stage0: this host's machine is $machine; arbor's relays are built for x86_64 and aarch64" >&2; exit 70 ;;
esac
if [ "$m" != "$sent" ]; then
    head -c "$n" >/dev/null || exit 70
    echo "ARBOR-STAGE0 MACHINE $m"
    n=
    read -r n || true
    case $n in
        ''|*[!0-9]*) echo "arbor-stage0: no relay for $m came" >&2; exit 70 ;;
    esac
fi
want=${ARBOR_STAGE0_LOADER:-any}
if [ "$want" = any -o "$want" = perl ] && command -v perl >/dev/null 2>&1; then
    exec perl -e '
        use Config;
        my ($n, $node) = @ARGV;
        my $name = "arbor-relay";
        # memfd_create, numbered for the machine perl itself runs as.
        my $nr = $Config{archname} =~ /^(x86_64|amd64)/ ? 319
               : $Config{archname} =~ /^aarch64/ ? 279 : -1;
        my $fd = $nr < 0 ? -1 : syscall($nr, $name, 1);
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
    ' "$n" "$node"
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
