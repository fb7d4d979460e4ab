#!/usr/bin/env bash
#
# Download Llama 2 / Llama 3.x weights with the signed URL that Meta sends by
# email after the license has been accepted.
#
# Usage:
#   ./download.sh [--family llama2|llama3]
#
# Interactive: the script asks for the URL and for the models to fetch.
# Non-interactive: set the environment variables below and nothing is asked.
#   PRESIGNED_URL    signed URL from the email (it contains a '*')
#   MODEL_SIZE       comma-separated model names; empty means "all models of
#                    the family" (same as pressing Enter at the prompt)
#   TARGET_FOLDER    where to put the files (default: current directory)
#   LLAMA_FAMILY     llama2 or llama3 (same as --family); normally inferred
#                    from the model names
#   LLAMA_DOWNLOADER wget or curl (default: wget when installed, else curl)
#
# Re-running the script resumes interrupted shard downloads.
#
# Note: kept compatible with the bash 3.2 that ships with macOS (no
# associative arrays, no ${var,,}).

set -euo pipefail

# ---------------------------------------------------------------------------
# Model table: the only place that knows which models exist.
# Columns: name, family, folder (local folder == path in the bucket), shards.
# Add a line here to support a new model.
# ---------------------------------------------------------------------------
MODEL_TABLE='
7B                          llama2  llama-2-7b                  1
13B                         llama2  llama-2-13b                 2
70B                         llama2  llama-2-70b                 8
7B-chat                     llama2  llama-2-7b-chat             1
13B-chat                    llama2  llama-2-13b-chat            2
70B-chat                    llama2  llama-2-70b-chat            8
Meta-Llama-3-8B             llama3  Meta-Llama-3-8B             1
Meta-Llama-3-8B-Instruct    llama3  Meta-Llama-3-8B-Instruct    1
Meta-Llama-3-70B            llama3  Meta-Llama-3-70B            8
Meta-Llama-3-70B-Instruct   llama3  Meta-Llama-3-70B-Instruct   8
Llama3.1-8B                 llama3  Llama3.1-8B                 1
Llama3.1-8B-Instruct        llama3  Llama3.1-8B-Instruct        1
Llama3.1-70B                llama3  Llama3.1-70B                8
Llama3.1-70B-Instruct       llama3  Llama3.1-70B-Instruct       8
Llama3.2-1B                 llama3  Llama3.2-1B                 1
Llama3.2-1B-Instruct        llama3  Llama3.2-1B-Instruct        1
Llama3.2-3B                 llama3  Llama3.2-3B                 1
Llama3.2-3B-Instruct        llama3  Llama3.2-3B-Instruct        1
'

# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------
die() {
    printf 'ERROR: %s\n' "$*" >&2
    exit 1
}

lower() {
    printf '%s' "$1" | tr '[:upper:]' '[:lower:]'
}

trim() {
    local s="$1"
    s="${s#"${s%%[![:space:]]*}"}"
    s="${s%"${s##*[![:space:]]}"}"
    printf '%s' "$s"
}

family_label() {
    case "$1" in
        llama2) printf 'Llama 2' ;;
        llama3) printf 'Llama 3.x' ;;
    esac
}

# Comma-separated list of the model names of one family.
models_of_family() {
    local want="$1" name fam dir shards out=""
    while read -r name fam dir shards; do
        [[ -z "$name" || "$fam" != "$want" ]] && continue
        out="${out:+$out,}$name"
    done <<< "$MODEL_TABLE"
    printf '%s' "$out"
}

# Print "name family folder shards" for a model name (case-insensitive),
# or return 1 when the name is unknown.
lookup_model() {
    local want name fam dir shards
    want="$(lower "$1")"
    while read -r name fam dir shards; do
        [[ -z "$name" ]] && continue
        if [[ "$(lower "$name")" == "$want" ]]; then
            printf '%s %s %s %s\n' "$name" "$fam" "$dir" "$shards"
            return 0
        fi
    done <<< "$MODEL_TABLE"
    return 1
}

valid_names_message() {
    printf 'Valid model names:\n'
    printf '  Llama 2:   %s\n' "$(models_of_family llama2 | sed 's/,/, /g')"
    printf '  Llama 3.x: %s\n' "$(models_of_family llama3 | sed 's/,/, /g')"
}

normalize_family() {
    case "$(lower "$1")" in
        llama2 | llama-2 | 2) printf 'llama2' ;;
        llama3 | llama-3 | 3 | llama3.1 | llama3.2) printf 'llama3' ;;
        *) return 1 ;;
    esac
}

usage() {
    sed -n '3,19p' "$0" | sed 's/^# \{0,1\}//'
}

# Read one line from stdin after printing a prompt. A missing final newline
# or end of input must not abort the script under `set -e`.
ask() {
    local prompt="$1" answer=""
    printf '%s' "$prompt" >&2
    IFS= read -r answer || true
    printf '%s' "$answer"
}

# ---------------------------------------------------------------------------
# Arguments and settings
# ---------------------------------------------------------------------------
FAMILY="${LLAMA_FAMILY:-}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --family)
            [[ $# -ge 2 ]] || die "--family needs a value (llama2 or llama3)"
            FAMILY="$2"
            shift 2
            ;;
        --family=*)
            FAMILY="${1#--family=}"
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            die "unknown argument '$1' (see --help)"
            ;;
    esac
done
if [[ -n "$FAMILY" ]]; then
    FAMILY_ARG="$FAMILY"
    FAMILY="$(normalize_family "$FAMILY_ARG")" \
        || die "unknown model family '$FAMILY_ARG'; use llama2 or llama3"
fi

# --- signed URL -------------------------------------------------------------
URL="${PRESIGNED_URL:-}"
if [[ -z "$URL" ]]; then
    URL="$(ask "Enter the URL from email: ")"
    [[ -t 0 ]] || printf '\n' >&2
fi
URL="$(trim "$URL")"
[[ -n "$URL" ]] || die "no URL given; paste the download URL from Meta's email (or set PRESIGNED_URL)"
case "$URL" in
    *'*'*) ;;
    *) die "the URL must contain a '*' (copy the whole URL from the email, unchanged)" ;;
esac
# Everything before and after the first '*': a file's URL is PREFIX + path + SUFFIX.
URL_PREFIX="${URL%%\**}"
URL_SUFFIX="${URL#*\*}"

# --- model list -------------------------------------------------------------
if [[ -n "${MODEL_SIZE+set}" ]]; then
    REQUESTED="$MODEL_SIZE"
else
    if [[ -n "$FAMILY" ]]; then
        REQUESTED="$(ask "Enter the list of models to download without spaces ($(models_of_family "$FAMILY")), or press Enter for all: ")"
    else
        {
            printf 'Available models:\n'
            printf '  Llama 2:   %s\n' "$(models_of_family llama2)"
            printf '  Llama 3.x: %s\n' "$(models_of_family llama3)"
        } >&2
        REQUESTED="$(ask "Enter the list of models to download without spaces (e.g. 7B,13B or Llama3.2-1B), or press Enter for all Llama 2 models: ")"
    fi
    [[ -t 0 ]] || printf '\n' >&2
fi
REQUESTED="$(trim "$REQUESTED")"
if [[ -z "$REQUESTED" ]]; then
    REQUESTED="$(models_of_family "${FAMILY:-llama2}")"
fi

# Resolve every name before anything is downloaded.
SEL_NAMES=()
SEL_DIRS=()
SEL_SHARDS=()
SEEN=","
BAD=""
REQ_LIST=()
IFS=',' read -r -a REQ_LIST <<< "$REQUESTED" || true
for raw in "${REQ_LIST[@]}"; do
    m="$(trim "$raw")"
    [[ -z "$m" ]] && continue
    if ! row="$(lookup_model "$m")"; then
        BAD="${BAD:+$BAD, }$m"
        continue
    fi
    read -r name fam dir shards <<< "$row"
    case "$SEEN" in *",$name,"*) continue ;; esac
    SEEN="$SEEN$name,"
    if [[ -z "$FAMILY" ]]; then
        FAMILY="$fam"
    elif [[ "$fam" != "$FAMILY" ]]; then
        die "'$name' is a $(family_label "$fam") model but the download is for $(family_label "$FAMILY") models; one URL serves one family, so download the families separately"
    fi
    SEL_NAMES+=("$name")
    SEL_DIRS+=("$dir")
    SEL_SHARDS+=("$shards")
done
if [[ -n "$BAD" ]]; then
    {
        printf 'ERROR: unknown model name(s): %s\n' "$BAD"
        valid_names_message
    } >&2
    exit 1
fi
[[ ${#SEL_NAMES[@]} -gt 0 ]] || die "no model selected"

# --- tools ------------------------------------------------------------------
DOWNLOADER="${LLAMA_DOWNLOADER:-}"
if [[ -z "$DOWNLOADER" ]]; then
    if command -v wget > /dev/null 2>&1; then
        DOWNLOADER=wget
    elif command -v curl > /dev/null 2>&1; then
        DOWNLOADER=curl
    else
        die "neither wget nor curl is installed"
    fi
fi
case "$DOWNLOADER" in
    wget | curl) command -v "$DOWNLOADER" > /dev/null 2>&1 || die "$DOWNLOADER is not installed" ;;
    *) die "LLAMA_DOWNLOADER must be wget or curl, not '$DOWNLOADER'" ;;
esac

if command -v md5sum > /dev/null 2>&1; then
    MD5_TOOL=md5sum
elif command -v md5 > /dev/null 2>&1; then
    MD5_TOOL=md5 # macOS
else
    die "md5sum (or md5 on macOS) is needed to verify the downloads"
fi

TARGET="${TARGET_FOLDER:-.}"
mkdir -p "$TARGET"

# ---------------------------------------------------------------------------
# Download and verification
# ---------------------------------------------------------------------------

# fetch MODE RELPATH: download bucket file RELPATH to $TARGET/RELPATH.
# MODE "resume" continues a partial file; "fresh" always re-downloads.
fetch() {
    local mode="$1" rel="$2" url out rc=0
    url="${URL_PREFIX}${rel}${URL_SUFFIX}"
    out="$TARGET/$rel"
    if [[ "$DOWNLOADER" == wget ]]; then
        if [[ "$mode" == resume ]]; then
            wget --continue "$url" -O "$out" || rc=$?
        else
            wget "$url" -O "$out" || rc=$?
        fi
    else
        if [[ "$mode" == resume ]]; then
            local code=""
            code="$(curl -fL -C - -w '%{http_code}' "$url" -o "$out")" || rc=$?
            # curl -f reports 416 as an error; after a resume request it just
            # means that the file is already complete (the checksum decides).
            if [[ $rc -eq 22 && "$code" == 416 && -s "$out" ]]; then
                echo "$rel is already fully downloaded"
                rc=0
            fi
        else
            curl -fL "$url" -o "$out" || rc=$?
        fi
    fi
    if [[ $rc -ne 0 ]]; then
        # Do not leave an empty file behind; keep partial data for resuming.
        if [[ -f "$out" && ! -s "$out" ]]; then
            rm -f "$out"
        fi
        die "failed to download '$rel' ($DOWNLOADER exit code $rc). The server refused or does not have this file: check that the model is covered by your license email and that the URL has not expired (signed URLs are valid for a limited time and number of downloads)"
    fi
}

md5_of() {
    if [[ "$MD5_TOOL" == md5sum ]]; then
        md5sum "$1" | cut -d' ' -f1
    else
        md5 -q "$1"
    fi
}

# verify DIR CHECKLIST: check every "md5  file" line of DIR/CHECKLIST
# (md5sum -c format, paths relative to DIR). DIR is relative to $TARGET.
verify() {
    local dir="$1" list="$2" base line sum file actual shown checked=0 failed=""
    if [[ "$dir" == . ]]; then base="$TARGET"; else base="$TARGET/$dir"; fi
    while IFS= read -r line || [[ -n "$line" ]]; do
        line="${line%$'\r'}"
        [[ -z "$(trim "$line")" ]] && continue
        sum="${line%%[[:space:]]*}"
        file="${line#"$sum"}"
        file="${file#[[:space:]]}"
        file="${file#[[:space:]*]}" # "sum  file" (text) or "sum *file" (binary)
        if [[ ! "$sum" =~ ^[0-9a-fA-F]{32}$ || -z "$file" ]]; then
            die "malformed line in $dir/$list: '$line'"
        fi
        if [[ "$dir" == . ]]; then shown="$file"; else shown="$dir/$file"; fi
        checked=$((checked + 1))
        if [[ ! -f "$base/$file" ]]; then
            printf '%s: FAILED (missing)\n' "$shown"
            failed="${failed:+$failed, }$shown"
            continue
        fi
        actual="$(md5_of "$base/$file")"
        if [[ "$(lower "$actual")" == "$(lower "$sum")" ]]; then
            printf '%s: OK\n' "$shown"
        else
            printf '%s: FAILED\n' "$shown"
            failed="${failed:+$failed, }$shown"
        fi
    done < "$base/$list"
    [[ $checked -gt 0 ]] || die "$dir/$list lists no files; the download of the checklist went wrong, delete it and rerun"
    if [[ -n "$failed" ]]; then
        die "checksum mismatch for: $failed (in $TARGET). The file is corrupt or incomplete: delete it and run this script again to download it again"
    fi
}

echo "Downloading $(family_label "$FAMILY") models into $TARGET: ${SEL_NAMES[*]}"

echo "Downloading LICENSE and Acceptable Usage Policy"
fetch fresh LICENSE
fetch fresh USE_POLICY.md

if [[ "$FAMILY" == llama2 ]]; then
    # Llama 2 models share one tokenizer at the top of the target folder.
    echo "Downloading tokenizer"
    fetch resume tokenizer.model
    fetch fresh tokenizer_checklist.chk
    echo "Checking checksums"
    verify . tokenizer_checklist.chk
fi

for i in "${!SEL_NAMES[@]}"; do
    name="${SEL_NAMES[$i]}"
    dir="${SEL_DIRS[$i]}"
    shards="${SEL_SHARDS[$i]}"
    echo "Downloading $name"
    mkdir -p "$TARGET/$dir"
    s=0
    while [[ $s -lt $shards ]]; do
        echo "Downloading shard $((s + 1)) of $shards for $name"
        fetch resume "$dir/$(printf 'consolidated.%02d.pth' "$s")"
        s=$((s + 1))
    done
    fetch fresh "$dir/params.json"
    if [[ "$FAMILY" == llama3 ]]; then
        # Llama 3.x models each carry their own tokenizer.
        echo "Downloading tokenizer for $name"
        fetch resume "$dir/tokenizer.model"
    fi
    fetch fresh "$dir/checklist.chk"
    echo "Checking checksums"
    verify "$dir" checklist.chk
done

echo "Done: ${SEL_NAMES[*]} downloaded to $TARGET"
