#!/usr/bin/env bash
# download.sh: fetch, check and extract dlib's 300-W archive (68-point iBUG face landmarks) into the data folder.
#
# The archive (about 1.7 GB) downloads into DATA/ibug_300W_large_face_landmark_dataset.tar.gz.part, resumes
# where it stopped when run again, and is renamed to .tar.gz only once complete. It is tested (gzip, tar, both
# label XMLs listed) before anything is extracted, extracted into a temporary folder inside DATA, moved into
# place (images first, label XMLs last), and only then is DATA/.download-complete written and the archive
# removed; a later run that finds that marker does nothing.
#
# Licence: the 300-W images and annotations (iBUG, Imperial College London, redistributed by dlib) are for
# non-commercial research use only; see https://ibug.doc.ic.ac.uk/resources/facial-point-annotations/.
# Agree to those terms before you download.
set -euo pipefail

readonly DEFAULT_URL="http://dlib.net/files/data/ibug_300W_large_face_landmark_dataset.tar.gz"
readonly TOP="ibug_300W_large_face_landmark_dataset"
readonly LABELS=(labels_ibug_300W_train.xml labels_ibug_300W_test.xml)
readonly MARKER=".download-complete"

usage() {
    echo "usage: bash download.sh [DATA_DIR]   (default: \$DATA_DIR, else data/; archive URL: \$DLIB_300W_URL)"
}

die() {
    echo "download.sh: $*" >&2
    exit 1
}

is_complete() {
    local data_dir=$1 label
    [[ -f "$data_dir/$MARKER" ]] || return 1
    for label in "${LABELS[@]}"; do
        [[ -f "$data_dir/$label" ]] || return 1
    done
}

# Progress bars only for a person at a terminal; in logs and tests the only output on failure is one line.
fetch_with_curl() {
    local url=$1 part=$2 message status=0
    if [[ -t 2 ]]; then
        # The bar and curl's own error are on the terminal already; stdout carries just the HTTP status.
        message=$(curl --fail --location --continue-at - --output "$part" --progress-bar \
            --write-out 'HTTP %{http_code}' "$url") || status=$?
    else
        message=$(curl --fail --location --continue-at - --output "$part" --silent --show-error "$url" 2>&1) \
            || status=$?
    fi
    # 416 to a resume: the .part already holds the whole file (the last run stopped before renaming it), so
    # it goes on to the archive check rather than failing on every run.
    if ((status == 22)) && [[ $message == *" 416"* ]]; then
        echo "download.sh: $part already holds the whole file"
        return 0
    fi
    ((status == 33)) && die "cannot resume $part: the server ignores byte ranges; delete it and run again"
    ((status == 0)) && return 0
    [[ -t 2 ]] && die "cannot download $url (curl exit $status, see above); run again to resume"
    die "cannot download $url (${message##*$'\n'})"
}

fetch_with_wget() {
    local url=$1 part=$2 message status=0
    if [[ -t 2 ]]; then
        wget --continue --no-verbose --show-progress --output-document "$part" "$url" || status=$?
        ((status == 0)) || die "cannot download $url (wget exit $status, see above); run again to resume"
    else
        message=$(wget --continue --no-verbose --output-document "$part" "$url" 2>&1) || {
            message=${message##*$'\n'}
            # wget -nv starts its lines with a timestamp; the reason is what follows.
            [[ $message =~ ^[0-9-]+\ [0-9:]+\ (.*)$ ]] && message=${BASH_REMATCH[1]}
            die "cannot download $url (wget: $message)"
        }
    fi
}

fetch() {
    if command -v curl >/dev/null; then
        fetch_with_curl "$@"
    elif command -v wget >/dev/null; then
        fetch_with_wget "$@"
    else
        die "needs curl or wget to download $1"
    fi
}

# A bad archive is caught here, before extraction can leave half a dataset behind.
check_archive() {
    local archive=$1 listing=$2 label
    gzip --test "$archive" 2>/dev/null && tar -tzf "$archive" >"$listing" 2>/dev/null \
        || die "$archive is not a valid archive; delete it and run again"
    for label in "${LABELS[@]}"; do
        grep -qx "\(\./\)\?$TOP/$label" "$listing" \
            || die "$archive does not contain $TOP/$label; delete it and run again"
    done
}

# Anything already at a destination is a leftover of an interrupted move (no marker yet), so it is replaced.
move_into_place() {
    local from=$1 data_dir=$2 entry name
    for entry in "$from"/* "$from"/.[!.]*; do
        [[ -e "$entry" ]] || continue
        name=$(basename "$entry")
        [[ " ${LABELS[*]} " == *" $name "* ]] && continue
        rm -rf "${data_dir:?}/$name"
        mv "$entry" "$data_dir/$name"
    done
    for name in "${LABELS[@]}"; do
        mv -f "$from/$name" "$data_dir/$name"
    done
}

main() {
    case "${1:-}" in
        -h | --help) usage; exit 0 ;;
        -*) usage >&2; exit 2 ;;
    esac
    (($# <= 1)) || { usage >&2; exit 2; }
    local data_dir=${1:-${DATA_DIR:-data}}
    local url=${DLIB_300W_URL:-$DEFAULT_URL}
    local archive="$data_dir/$TOP.tar.gz"

    if is_complete "$data_dir"; then
        echo "download.sh: $data_dir already holds the 300-W dataset; nothing to do"
        exit 0
    fi
    mkdir -p "$data_dir" || die "cannot create $data_dir"

    if [[ ! -f "$archive" ]]; then
        echo "download.sh: downloading $url into $archive"
        fetch "$url" "$archive.part"
        mv "$archive.part" "$archive"
    fi

    echo "download.sh: checking $archive"
    # Global, not local: the EXIT trap runs after main has returned.
    WORK=$(mktemp -d "$data_dir/.extract.XXXXXX")
    trap 'rm -rf "$WORK"' EXIT
    check_archive "$archive" "$WORK/listing"

    echo "download.sh: extracting into $data_dir"
    mkdir "$WORK/tree"
    local message
    message=$(tar -xzf "$archive" -C "$WORK/tree" 2>&1) || die "cannot extract $archive (${message##*$'\n'})"
    move_into_place "$WORK/tree/$TOP" "$data_dir"
    echo "$url" >"$data_dir/$MARKER"
    rm -f "$archive"
    echo "download.sh: 300-W ready in $data_dir"
}

main "$@"
