#!/bin/bash
# install.sh: install, upgrade or remove wazuh-cluster in a Wazuh 3.0 manager (SPEC §7).
#
#   ./install.sh [--prefix DIR] [--python PATH] [--no-start] [--uninstall]
#
# What it installs is listed in PREFIX/var/wazuh-cluster-install/manifest, and every file it
# replaced is kept under PREFIX/var/wazuh-cluster-install/backup/, so that --uninstall can remove
# exactly what it added and put back what it replaced. Re-running it upgrades in place and keeps
# ossec.conf, the key and the database.
#
# Manifest lines are "KIND PATH" with PATH relative to the prefix:
#   file P     a file we installed (removed on uninstall)
#   tree P     a folder tree we installed (removed on uninstall)
#   dir P      a folder we created (removed on uninstall when empty)
#   backup P   P existed before us; the original is in backup/P and is restored on uninstall
#   keep P     a file we created once and leave to the operator (ossec.conf): removed on uninstall
#   conf-block etc/ossec.conf   we appended a marked <ossec_config> block to the operator's file
#   sum P CKSUM   checksum of a shipped file as we installed it (to spot operator edits)
#   created logs/cluster.log   an empty log we created
#   initconf /etc/ossec-init.conf   we created it (prefix /var/ossec only)
set -u
umask 022

PROG=install.sh
# The default prefix is the Wazuh installation this host already has, else /var/ossec.
PREFIX=$(sed -n 's/^DIRECTORY=["'"'"']\{0,1\}\([^"'"'"']*\)["'"'"']\{0,1\}[[:space:]]*$/\1/p' \
    /etc/ossec-init.conf 2>/dev/null | tail -n 1)
[ -n "$PREFIX" ] || PREFIX=/var/ossec
PYTHON=
START=yes
UNINSTALL=no
SRC=$(cd "$(dirname "$0")" && pwd -P)

# Python entry points we ship; everything in bin/ with a python first line is treated the same.
STATE_REL=var/wazuh-cluster-install
REALBIN_REL=lib/wazuh-cluster-bin
BLOCK_BEGIN='<!-- wazuh-cluster: block added by install.sh (removed by install.sh --uninstall) -->'
BLOCK_END='<!-- wazuh-cluster: end of block added by install.sh -->'

die() { echo "$PROG: error: $*" >&2; exit 1; }
say() { echo "$PROG: $*"; }
warn() { echo "$PROG: warning: $*" >&2; }

usage() {
    cat <<EOF
Usage: $PROG [--prefix DIR] [--python PATH] [--no-start] [--uninstall]
  --prefix DIR    Wazuh installation directory (default: DIRECTORY of /etc/ossec-init.conf,
                  else /var/ossec)
  --python PATH   interpreter to run the daemons (default: python3 >= 3.6, else python2.7 on PATH)
  --no-start      do not run 'ossec-control restart' at the end
  --uninstall     remove what a previous run installed and restore what it replaced
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX=$2; shift 2 ;;
        --prefix=*) PREFIX=${1#--prefix=}; shift ;;
        --python) [ $# -ge 2 ] || die "--python needs an interpreter path"; PYTHON=$2; shift 2 ;;
        --python=*) PYTHON=${1#--python=}; shift ;;
        --no-start) START=no; shift ;;
        --uninstall) UNINSTALL=yes; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option '$1'" ;;
    esac
done

[ -n "$PREFIX" ] || die "--prefix is empty"
case "$PREFIX" in /*) ;; *) PREFIX="$(pwd -P)/$PREFIX" ;; esac
PREFIX=${PREFIX%/}
[ -n "$PREFIX" ] || die "refusing to install into /"
STATE="$PREFIX/$STATE_REL"
MANIFEST="$STATE/manifest"
BACKUP="$STATE/backup"
IS_ROOT=no
[ "$(id -u)" = 0 ] && IS_ROOT=yes

# ---------------------------------------------------------------- manifest helpers
manifest_has() {  # KIND PATH
    [ -f "$MANIFEST" ] && grep -qxF "$1 $2" "$MANIFEST"
}

manifest_add() {  # KIND PATH
    manifest_has "$1" "$2" || echo "$1 $2" >> "$MANIFEST"
}

manifest_sum() {  # PATH -> recorded checksum or empty
    [ -f "$MANIFEST" ] || return 0
    awk -v p="$1" '$1 == "sum" && $2 == p { s = $3 } END { if (s != "") print s }' "$MANIFEST"
}

set_sum() {  # PATH: record the checksum of PREFIX/PATH as installed
    local tmp
    tmp="$MANIFEST.tmp.$$"
    awk -v p="$1" '!($1 == "sum" && $2 == p)' "$MANIFEST" > "$tmp" && mv -f "$tmp" "$MANIFEST"
    echo "sum $1 $(checksum "$PREFIX/$1")" >> "$MANIFEST"
}

checksum() { cksum < "$1" | awk '{ print $1 "-" $2 }'; }

owned() {  # PATH: installed by us (a file or a tree)
    manifest_has file "$1" || manifest_has tree "$1"
}

# Keep the original of PATH the first time we replace it (never a second time: that would be ours).
backup_once() {  # PATH
    local rel=$1
    if [ -e "$PREFIX/$rel" ] || [ -L "$PREFIX/$rel" ]; then
        if ! owned "$rel" && ! manifest_has backup "$rel"; then
            mkdir -p "$(dirname "$BACKUP/$rel")" || die "cannot create $BACKUP"
            cp -a "$PREFIX/$rel" "$BACKUP/$rel" || die "cannot back up $PREFIX/$rel"
            manifest_add backup "$rel"
            say "kept the original $rel in $BACKUP/$rel"
        fi
    fi
}

# mkdir_rec PATH [MODE [OWNER]]: create the missing folders (recorded in the manifest), then
# give PATH its MODE and OWNER only when it is ours (created now or by an earlier run). A
# folder that was there before us (a Wazuh manager's own) keeps its owner, group and mode.
mkdir_rec() {
    local rel=$1 mode=${2:-} owner=${3:-} part='' comp
    local IFS=/
    for comp in $rel; do
        [ -n "$comp" ] || continue
        part=${part:+$part/}$comp
        if [ ! -d "$PREFIX/$part" ]; then
            mkdir "$PREFIX/$part" || die "cannot create folder $PREFIX/$part"
            manifest_add dir "$part"
        fi
    done
    unset IFS
    manifest_has dir "$rel" || return 0
    [ -n "$mode" ] && { chmod "$mode" "$PREFIX/$rel" || die "cannot chmod $PREFIX/$rel"; }
    if [ -n "$owner" ] && [ "$IS_ROOT" = yes ]; then
        chown "$owner" "$PREFIX/$rel" || die "cannot chown $PREFIX/$rel to $owner"
    fi
    return 0
}

# Single-quote VALUE for a sh script.
shquote() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }

# ---------------------------------------------------------------- uninstall
stop_daemons() {
    local ctl pidf pid pids='' n=0 left
    ctl="$PREFIX/bin/ossec-control"
    # Our ossec-control stops only our daemons; a Wazuh one would stop the whole manager, so
    # for that case (and whatever else is left) our daemons are signalled directly.
    if [ -x "$ctl" ] && owned bin/ossec-control; then
        for pidf in "$PREFIX"/var/run/wazuh-clusterd*.pid; do
            [ -f "$pidf" ] && pids="$pids $(cat "$pidf" 2>/dev/null)"
        done
        "$ctl" stop >/dev/null 2>&1
    fi
    for pidf in "$PREFIX"/var/run/wazuh-clusterd*.pid; do
        [ -f "$pidf" ] || continue
        pid=$(cat "$pidf" 2>/dev/null)
        case "$pid" in ''|*[!0-9]*) ;; *) kill -TERM "$pid" 2>/dev/null; pids="$pids $pid" ;; esac
        rm -f "$pidf"
    done
    # Wait (bounded) until they are gone, so that nothing they write outlives the removal.
    while [ $n -lt 100 ]; do
        left=
        for pid in $pids; do
            case "$pid" in ''|*[!0-9]*) continue ;; esac
            if kill -0 "$pid" 2>/dev/null && ! grep -q ') Z' "/proc/$pid/stat" 2>/dev/null; then
                left="$left $pid"
            fi
        done
        [ -z "$left" ] && return 0
        sleep 0.1 2>/dev/null || sleep 1
        n=$((n + 1))
    done
    warn "daemons still running after SIGTERM:$left"
}

strip_conf_block() {  # remove our marked block from etc/ossec.conf
    local conf="$PREFIX/etc/ossec.conf" tmp
    [ -f "$conf" ] || return 0
    tmp="$conf.wazuh-cluster.$$"
    awk -v b="$BLOCK_BEGIN" -v e="$BLOCK_END" '
        $0 == b { skip = 1; next }
        skip && $0 == e { skip = 0; next }
        !skip { print }' "$conf" > "$tmp" || { rm -f "$tmp"; die "cannot rewrite $conf"; }
    cat "$tmp" > "$conf" && rm -f "$tmp"   # in place: keeps the file's owner and mode
}

do_uninstall() {
    [ -f "$MANIFEST" ] || die "nothing to uninstall: $MANIFEST not found"
    stop_daemons
    local kind rel
    # Files and trees first, then restore backups, then empty folders deepest first.
    while read -r kind rel _; do
        case "$kind" in
            file|keep) rm -f "$PREFIX/$rel" ;;
            tree) rm -rf "${PREFIX:?}/$rel" ;;
            conf-block) strip_conf_block ;;
            initconf) rm -f /etc/ossec-init.conf ;;
        esac
    done < "$MANIFEST"
    # Runtime files of our daemons (cache database, sockets, our log): nothing else uses them.
    rm -f "$PREFIX"/var/db/cluster.db "$PREFIX"/var/db/cluster.db-journal \
        "$PREFIX"/var/db/cluster.db-wal "$PREFIX"/var/db/cluster.db-shm \
        "$PREFIX"/queue/ossec/cluster_db "$PREFIX"/queue/ossec/cluster_control
    rm -rf "${PREFIX:?}"/queue/cluster-staging  # the receiver's temporary files (ours alone)
    if manifest_has dir logs || manifest_has created logs/cluster.log; then
        rm -f "$PREFIX"/logs/cluster.log
    fi
    while read -r kind rel _; do
        if [ "$kind" = backup ]; then
            rm -rf "${PREFIX:?}/$rel"
            mkdir -p "$(dirname "$PREFIX/$rel")"
            mv -f "$BACKUP/$rel" "$PREFIX/$rel" || die "cannot restore $PREFIX/$rel"
            say "restored $rel"
        fi
    done < "$MANIFEST"
    local dirs
    dirs=$(awk '$1 == "dir" { print $2 }' "$MANIFEST" | sort -r)
    rm -rf "${STATE:?}"
    local d
    for d in $dirs; do
        rmdir "$PREFIX/$d" 2>/dev/null
    done
    rmdir "$PREFIX" 2>/dev/null
    say "wazuh-cluster removed from $PREFIX"
    exit 0
}

if [ "$UNINSTALL" = yes ]; then
    do_uninstall
fi

# ---------------------------------------------------------------- user
# Created before the interpreter is chosen: it must be one that user ossec can run.
create_user() {
    [ "$IS_ROOT" = yes ] || return 0
    if ! getent group ossec >/dev/null 2>&1; then
        if command -v groupadd >/dev/null 2>&1; then groupadd -r ossec
        else addgroup -S ossec; fi || die "cannot create group ossec"
        say "created group ossec"
    fi
    if ! getent passwd ossec >/dev/null 2>&1; then
        if command -v useradd >/dev/null 2>&1; then
            useradd -r -g ossec -d "$PREFIX" -s /sbin/nologin -M ossec
        else
            adduser -S -G ossec -h "$PREFIX" -s /sbin/nologin -H ossec
        fi || die "cannot create user ossec"
        say "created user ossec"
    fi
}

# ---------------------------------------------------------------- interpreter
[ -f "$SRC/bin/wazuh-clusterd" ] && [ -d "$SRC/lib/wazuh_cluster" ] \
    || die "run install.sh from the wazuh-cluster source tree ($SRC has no bin/wazuh-clusterd)"

# A version check that Python 2.4+ can parse, so that an old interpreter gets a clear message.
PYCHECK='import sys
v = sys.version_info
if not ((v[0] == 2 and v[1] == 7) or (v[0] == 3 and v[1] >= 6) or v[0] > 3):
    sys.exit(3)
sys.stdout.write(sys.executable)'

py_ok() { "$1" -c "$PYCHECK" 2>/dev/null; }

# The environment that sh wrappers give the interpreter (software collections need their
# LD_LIBRARY_PATH; a PYTHONPATH may hold cryptography), as sh assignments.
ENVLINES=
for var in LD_LIBRARY_PATH PATH PYTHONPATH PYTHONHOME X_SCLS MANPATH PKG_CONFIG_PATH XDG_DATA_DIRS; do
    eval "isset=\${$var+x}"
    [ -n "$isset" ] || continue
    val=; eval "val=\${$var}"
    ENVLINES="$ENVLINES$var=$(shquote "$val"); export $var
"
done

# as_daemon SCRIPT ARGS...: sh -c SCRIPT the way ossec-control runs the daemons: through a
# shell with a bare environment and, as root, as user ossec (group ossec only), so that every
# path, library and module is looked up with ossec's rights. setpriv execs `env` while still
# privileged; everything after it (the shell, the interpreter, the loader) runs as ossec.
DAEMON_PATH=/usr/sbin:/usr/bin:/sbin:/bin
as_daemon() {
    local script=$1 args='' a
    shift
    if [ "$IS_ROOT" != yes ]; then
        env -i PATH="$DAEMON_PATH" /bin/sh -c "$script" sh "$@"
    elif command -v setpriv >/dev/null 2>&1; then
        setpriv --reuid=ossec --regid=ossec --clear-groups \
            env -i PATH="$DAEMON_PATH" /bin/sh -c "$script" sh "$@"
    else
        for a in "$@"; do args="$args $(shquote "$a")"; done
        su -s /bin/sh ossec -c "env -i PATH=$DAEMON_PATH /bin/sh -c $(shquote "$script") sh$args"
    fi
}

# daemon_python bare|env PY CODE: PY -c CODE as the daemons will run it, in a bare environment
# or in the one the sh wrappers set.
daemon_python() {
    local envlines=
    [ "$1" = env ] && envlines=$ENVLINES
    as_daemon "${envlines}exec \"\$1\" -c \"\$2\"" "$2" "$3" >/dev/null 2>&1
}

RUNNER="user $(id -un)"
[ "$IS_ROOT" = yes ] && RUNNER="user ossec"
unusable() {  # PY: the one-line error for an interpreter the daemons' user cannot start
    echo "$RUNNER cannot run $1 (it, or a library it loads, is under a folder $RUNNER cannot enter, such as /root): install a system-wide Python 2.7 or 3.6+ or give --python PATH of one that $RUNNER can run"
}

if [ -n "$PYTHON" ]; then
    case "$PYTHON" in
        */*) [ -x "$PYTHON" ] || die "interpreter $PYTHON not found or not executable" ;;
        *) command -v "$PYTHON" >/dev/null 2>&1 || die "interpreter $PYTHON not found on PATH" ;;
    esac
    PYREAL=$(py_ok "$PYTHON") \
        || die "$PYTHON is not Python 2.7 or 3.6+ (found $("$PYTHON" -V 2>&1 | head -n 1))"
    create_user
    daemon_python env "$PYREAL" 'import sys' || die "$(unusable "$PYREAL")"
else
    create_user
    PYREAL=
    UNUSABLE=
    # python3 first (maintained), python2.7 for old distributions (CentOS 6 software collection),
    # then the system's own when those on PATH are private to root (pyenv under /root).
    for cand in python3 python2.7 /usr/bin/python3 /usr/bin/python2.7 /usr/local/bin/python3; do
        command -v "$cand" >/dev/null 2>&1 || continue
        if PYREAL=$(py_ok "$cand"); then
            if daemon_python env "$PYREAL" 'import sys'; then PYTHON=$cand; break; fi
            UNUSABLE="$UNUSABLE $PYREAL"
        fi
        PYREAL=
    done
    [ -n "$PYREAL" ] || die "no Python 2.7 or 3.6+ that $RUNNER can run (found but private:${UNUSABLE:- none}): install a system-wide one or use --python PATH"
fi
[ -n "$PYREAL" ] && [ -x "$PYREAL" ] || die "cannot tell the absolute path of $PYTHON (sys.executable is empty)"
PYVER=$("$PYREAL" -c 'import sys; sys.stdout.write("%d.%d" % sys.version_info[:2])' 2>/dev/null) \
    || PYVER=$("$PYTHON" -c 'import sys; sys.stdout.write("%d.%d" % sys.version_info[:2])')
say "using Python $PYVER at $PYREAL"

# cryptography is the one runtime dependency: cryptography 3.3.x is the last for 2.7.
if ! "$PYTHON" -c 'import cryptography' >/dev/null 2>&1; then
    case "$PYVER" in 2.7) REQ='cryptography>=3.3,<3.4' ;; *) REQ='cryptography' ;; esac
    "$PYTHON" -m pip --version >/dev/null 2>&1 \
        || die "cryptography is missing and pip is not available for $PYREAL; install pip for it (e.g. python3-pip, python27-python-pip, or '$PYREAL -m ensurepip') and re-run"
    say "installing $REQ for $PYREAL"
    PIPHINT="pip could not install $REQ for $PYREAL (a distribution Python may want its package: python3-cryptography, python27-python-cryptography)"
    if [ "$IS_ROOT" = yes ]; then
        "$PYTHON" -m pip install -q "$REQ" || die "$PIPHINT"
    else
        "$PYTHON" -m pip install -q --user "$REQ" || die "$PIPHINT"
    fi
    "$PYTHON" -c 'import cryptography' >/dev/null 2>&1 \
        || die "cryptography still cannot be imported by $PYREAL after pip install"
fi

# Entry points are sh wrappers when the interpreter needs the environment it was found with
# (ossec-control runs from init with a bare one). Decided as the daemons will run: a library
# or module reached through a private folder works for root, not for ossec.
if daemon_python bare "$PYREAL" 'import cryptography'; then
    WRAP=no
elif daemon_python env "$PYREAL" 'import cryptography'; then
    WRAP=yes
    say "$PYREAL needs its environment: entry points will be sh wrappers"
elif daemon_python env "$PYREAL" 'import sys'; then
    die "$RUNNER can run $PYREAL but cannot import cryptography (installed under a folder $RUNNER cannot enter, such as /root/.local?): install it system-wide for $PYREAL (e.g. as root without --user, or python3-cryptography) or give --python PATH"
else
    die "$(unusable "$PYREAL")"
fi

# ---------------------------------------------------------------- folders
mkdir -p "$PREFIX" || die "cannot create $PREFIX"
VAR_EXISTED=no
[ -d "$PREFIX/var" ] && VAR_EXISTED=yes
mkdir -p "$STATE" "$BACKUP" || die "cannot create $STATE"
chmod 0750 "$STATE"
touch "$MANIFEST" || die "cannot write $MANIFEST"
[ "$VAR_EXISTED" = yes ] || manifest_add dir var

# Folders and their Wazuh 3.0 permissions (SPEC §2); the daemons run as ossec and write in them.
mkdir_rec bin
mkdir_rec lib
mkdir_rec etc 0770 root:ossec
mkdir_rec etc/shared 0770 root:ossec
mkdir_rec queue
mkdir_rec queue/agent-info 0770 ossec:ossec
mkdir_rec queue/agent-groups 0770 ossec:ossec
mkdir_rec queue/ossec 0770 ossec:ossec
mkdir_rec queue/rids 0770 ossec:ossec
mkdir_rec queue/syscheck 0750 ossec:ossec
mkdir_rec queue/rootcheck 0750 ossec:ossec
mkdir_rec backup 0750 ossec:ossec
mkdir_rec backup/agents 0750 ossec:ossec
mkdir_rec logs
mkdir_rec var
mkdir_rec var/run 0770 root:ossec
mkdir_rec var/db 0770 root:ossec
if [ ! -e "$PREFIX/logs/cluster.log" ]; then
    : > "$PREFIX/logs/cluster.log" || die "cannot create $PREFIX/logs/cluster.log"
    manifest_add created logs/cluster.log
fi
if manifest_has created logs/cluster.log; then
    chmod 0660 "$PREFIX/logs/cluster.log"
    [ "$IS_ROOT" = yes ] && chown ossec:ossec "$PREFIX/logs/cluster.log"
fi
if manifest_has dir logs && [ "$IS_ROOT" = yes ]; then
    chown ossec:ossec "$PREFIX/logs"
fi

# What the daemons need where the folders and files were there before us: we change none of
# them (a Wazuh manager's own stay as Wazuh made them), so say what is missing instead.
daemon_can() {  # write|read PATH
    case "$1" in
        write) as_daemon '[ -w "$1" ] && { [ ! -d "$1" ] || [ -x "$1" ]; }' "$2" ;;
        *) as_daemon '[ -r "$1" ]' "$2" ;;
    esac
}
need() {  # write|read REL WHY
    local path="$PREFIX/$2"
    [ -e "$path" ] || return 0
    daemon_can "$1" "$path" && return 0
    warn "$RUNNER cannot $1 $path ($(stat -c '%U:%G %a' "$path" 2>/dev/null), left as it was), where $3: give group ossec that right (as Wazuh 3.0 does) or the cluster will fail there"
}
need write etc "clients replace client.keys"
for rel in etc/shared queue/agent-groups queue/agent-info; do
    need write "$rel" "files are synchronised"
done
for rel in queue/rids queue/syscheck queue/rootcheck backup/agents; do
    need write "$rel" "removed agents' files are backed up and cleaned"
done
need write queue/ossec "the daemons make their sockets"
need write var/run "the daemons write their PID files"
need write var/db "the cluster database lives"
for rel in logs logs/cluster.log logs/ossec.log; do
    need write "$rel" "the daemons log"
done
for rel in etc/ossec.conf etc/internal_options.conf etc/local_internal_options.conf; do
    need read "$rel" "the configuration is read"
done

# ---------------------------------------------------------------- files
install_file() {  # SRC REL MODE: copy atomically (a running daemon keeps its old inode)
    local src=$1 rel=$2 mode=$3 tmp
    backup_once "$rel"
    tmp="$PREFIX/$rel.wazuh-cluster-new.$$"
    cp "$src" "$tmp" && chmod "$mode" "$tmp" && mv -f "$tmp" "$PREFIX/$rel" \
        || { rm -f "$tmp"; die "cannot install $PREFIX/$rel"; }
    manifest_add file "$rel"
}

with_shebang() {  # SRC DEST: the script with our interpreter on its first line
    { echo "#!$PYREAL"; tail -n +2 "$1"; } > "$2"
}

# The package: replaced as a whole so that modules removed upstream do not linger.
backup_once lib/wazuh_cluster
rm -rf "$PREFIX/lib/wazuh_cluster.new.$$"
mkdir -p "$PREFIX/lib/wazuh_cluster.new.$$" || die "cannot write in $PREFIX/lib"
(cd "$SRC/lib/wazuh_cluster" && tar cf - --exclude='*.pyc' --exclude='__pycache__' .) \
    | (cd "$PREFIX/lib/wazuh_cluster.new.$$" && tar xf -) || die "cannot copy lib/wazuh_cluster"
rm -rf "$PREFIX/lib/wazuh_cluster"
mv "$PREFIX/lib/wazuh_cluster.new.$$" "$PREFIX/lib/wazuh_cluster" || die "cannot install lib/wazuh_cluster"
manifest_add tree lib/wazuh_cluster
# Compiled once here: whoever cannot write the package's folder (user ossec, a member of
# group ossec running cluster_control) compiled every module at each start (~30 ms of CPU
# of each cluster_control on 3.13). Without the bytecode everything still runs.
"$PYREAL" -m compileall -q "$PREFIX/lib/wazuh_cluster" >/dev/null 2>&1 \
    || warn "could not byte-compile $PREFIX/lib/wazuh_cluster (each start compiles it)"
if [ "$IS_ROOT" = yes ]; then
    chown -R root:ossec "$PREFIX/lib/wazuh_cluster"
    chmod -R g+rX,o-w "$PREFIX/lib/wazuh_cluster"
fi

# Entry scripts: interpreter written into the first line; wrappers when the interpreter needs
# its environment (the real script then lives in lib/wazuh-cluster-bin, whose ../../lib is ours).
if [ "$WRAP" = yes ]; then
    mkdir_rec "$REALBIN_REL"
else
    rm -rf "${PREFIX:?}/$REALBIN_REL"
fi
for src in "$SRC"/bin/*; do
    [ -f "$src" ] || continue
    name=$(basename "$src")
    if head -n 1 "$src" | grep -q '^#!.*python'; then
        tmp=$(mktemp "$STATE/script.XXXXXX") || die "cannot write in $STATE"
        with_shebang "$src" "$tmp"
        if [ "$WRAP" = yes ]; then
            install_file "$tmp" "$REALBIN_REL/$name" 0750
            {
                echo "#!/bin/sh"
                echo "# wazuh-cluster: generated by install.sh. $PYREAL needs the environment it was"
                echo "# installed with; this wrapper sets it and runs the real $name."
                printf '%s' "$ENVLINES"
                echo "exec $(shquote "$PYREAL") $(shquote "$PREFIX/$REALBIN_REL/$name") \"\$@\""
            } > "$tmp"
            install_file "$tmp" "bin/$name" 0750
        else
            install_file "$tmp" "bin/$name" 0750
        fi
        rm -f "$tmp"
    else
        install_file "$src" "bin/$name" 0750
    fi
    [ "$IS_ROOT" = yes ] && chown root:ossec "$PREFIX/bin/$name"
done
if [ "$WRAP" = yes ] && [ "$IS_ROOT" = yes ]; then
    chown -R root:ossec "$PREFIX/$REALBIN_REL"
fi

# Shipped etc files: the template always; cluster.json unless the operator edited ours.
install_file "$SRC/etc/ossec.conf.template" etc/ossec.conf.template 0640
rel=etc/cluster.json
old_sum=$(manifest_sum "$rel")
if [ -f "$PREFIX/$rel" ] && [ -n "$old_sum" ] && [ "$(checksum "$PREFIX/$rel")" != "$old_sum" ]; then
    install_file "$SRC/$rel" "$rel.new" 0640
    warn "$PREFIX/$rel was edited: kept it; the shipped one is $rel.new"
else
    install_file "$SRC/$rel" "$rel" 0640
    set_sum "$rel"
fi
if [ "$IS_ROOT" = yes ]; then
    chown root:ossec "$PREFIX"/etc/ossec.conf.template "$PREFIX"/etc/cluster.json*
fi

# ossec-control: ours when the prefix has none (or ours from a previous run); a Wazuh one that
# manages wazuh-clusterd stays; any other one stays too and ours goes next to it.
CTL=bin/ossec-control
if [ ! -e "$PREFIX/$CTL" ] || owned "$CTL"; then
    install_file "$SRC/etc/ossec-control" "$CTL" 0750
    [ "$IS_ROOT" = yes ] && chown root:ossec "$PREFIX/$CTL"
elif grep -q wazuh-clusterd "$PREFIX/$CTL"; then
    say "kept the existing $CTL (it already manages wazuh-clusterd)"
else
    CTL=bin/wazuh-cluster-control
    install_file "$SRC/etc/ossec-control" "$CTL" 0750
    warn "$PREFIX/bin/ossec-control does not manage wazuh-clusterd; use $PREFIX/$CTL {start|stop|status}"
fi

# ---------------------------------------------------------------- ossec.conf
random_key() {
    local key
    key=$(LC_ALL=C tr -dc 'A-Za-z0-9' < /dev/urandom 2>/dev/null | head -c 32)
    [ ${#key} -eq 32 ] || die "cannot read random bytes from /dev/urandom"
    echo "$key"
}

host_address() {  # this host's first IPv4 address, as 3.0's own-node check sees it
    local a
    for a in $(hostname --all-ip-addresses 2>/dev/null) $(hostname -I 2>/dev/null); do
        case "$a" in
            127.*|*:*) ;;
            *.*.*.*) echo "$a"; return 0 ;;
        esac
    done
    return 1
}

CONF="$PREFIX/etc/ossec.conf"
TEMPLATE="$SRC/etc/ossec.conf.template"
if [ ! -e "$CONF" ]; then
    KEY=$(random_key) || exit 1
    if ADDR=$(host_address); then BIND=0.0.0.0
    else ADDR=127.0.0.1; BIND=127.0.0.1
        warn "no address from 'hostname --all-ip-addresses': the cluster binds to 127.0.0.1 only"
    fi
    sed -e "s|<key>[^<]*</key>|<key>$KEY</key>|" \
        -e "s|<node>NODE_IP</node>|<node>$ADDR</node>|" \
        -e "s|<bind_addr>[^<]*</bind_addr>|<bind_addr>$BIND</bind_addr>|" \
        -e "s|<node_type>[^<]*</node_type>|<node_type>master</node_type>|" \
        -e "s|<disabled>[^<]*</disabled>|<disabled>no</disabled>|" \
        "$TEMPLATE" > "$CONF.tmp.$$" || die "cannot write $CONF"
    chmod 0640 "$CONF.tmp.$$"
    mv -f "$CONF.tmp.$$" "$CONF" || die "cannot write $CONF"
    manifest_add keep etc/ossec.conf
    say "created $CONF: an enabled single-master cluster on $ADDR with a new key"
elif grep -q '<cluster>' "$CONF"; then
    say "kept the <cluster> block of $CONF"
else
    # No backup to restore here: --uninstall strips the marked block, keeping later edits.
    # A file without a final newline gets one, so that our marker starts its own line.
    [ -z "$(tail -c 1 "$CONF")" ] || echo >> "$CONF"
    {
        echo "$BLOCK_BEGIN"
        sed -e "s|<node>NODE_IP</node>|<node>$(host_address || echo 127.0.0.1)</node>|" "$TEMPLATE"
        echo "$BLOCK_END"
    } >> "$CONF" || die "cannot append to $CONF"
    manifest_add conf-block etc/ossec.conf
    say "appended a disabled <cluster> block to $CONF (set a key and <disabled>no</disabled> to enable it)"
fi
if [ "$IS_ROOT" = yes ] && manifest_has keep etc/ossec.conf; then
    chown root:ossec "$CONF"
fi

# /etc/ossec-init.conf: only for the standard prefix, and never over Wazuh's own.
if [ "$PREFIX" = /var/ossec ] && [ ! -e /etc/ossec-init.conf ] && [ "$IS_ROOT" = yes ]; then
    {
        echo "DIRECTORY=\"/var/ossec\""
        echo "NAME=\"Wazuh\""
        echo "VERSION=\"v3.0.0\""
        echo "DATE=\"$(date)\""
        echo "TYPE=\"server\""
    } > /etc/ossec-init.conf && chmod 0600 /etc/ossec-init.conf
    manifest_add initconf /etc/ossec-init.conf
fi

say "installed wazuh-cluster into $PREFIX"
if [ "$START" = yes ]; then
    "$PREFIX/$CTL" restart || die "'$PREFIX/$CTL restart' failed (see $PREFIX/logs/cluster.log)"
fi
exit 0
