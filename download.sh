#!/usr/bin/env bash
#
# Download Llama 2 / Llama 3 / Llama 3.1, 3.2, 3.3 weights with the signed URL
# that Meta sends by email after the license has been accepted.
#
# Usage:
#   ./download.sh [--family llama2|llama3|llama3.1|llama3.2|llama3.3]
#
# Interactive: the script asks for the URL and for the models to fetch.
# Non-interactive: set the environment variables below and nothing is asked.
#   PRESIGNED_URL    signed URL from the email (it contains a '*')
#   MODEL_SIZE       comma-separated model names; empty is what pressing Enter
#                    means in Meta's script for the family (see below)
#   TARGET_FOLDER    where to put the files (default: current directory)
#   LLAMA_FAMILY     same as --family; normally inferred from the model names
#   LLAMA_DOWNLOADER wget or curl (default: wget when installed, else curl)
#
# Model names are Meta's (any case): Llama 2: 7B, 13B, 70B, 7B-chat, 13B-chat,
# 70B-chat; Llama 3: 8B, 8B-instruct, 70B, 70B-instruct; Llama 3.1/3.2/3.3:
# llama-models' model ids (Llama3.1-8B, Llama3.2-1B-Instruct, ...). Enter means
# all Llama 2 models (all Llama 3 models with --family llama3); Meta's 3.x
# downloader has no "all", so 3.x models are always named.
#
# Re-running the script resumes interrupted shard downloads.
#
# Note: kept compatible with the bash 3.2 that ships with macOS (no
# associative arrays, no ${var,,}).

set -euo pipefail

# ---------------------------------------------------------------------------
# Model table: the only place that knows which models exist and where Meta's
# server keeps them (a file's URL is the signed URL with '*' replaced by
# "<bucket folder>/<file>").
# Columns: name, family, bucket folder, local folder, shards, extra files
# ("fp8": fp8_scales_NN.pt per shard), listed at the prompt (no: an alias).
#   llama2:  Meta's llama download.sh (shared tokenizer at the top)
#   llama3:  Meta's llama3 download.sh (LICENSE and USE_POLICY at the top)
#   llama3x: llama-models' downloader (sku_list.py: the folder is the model's
#            Hugging Face repository name; the name is the llama-models id)
# ---------------------------------------------------------------------------
MODEL_TABLE='
7B                                        llama2   llama-2-7b                                llama-2-7b                                1  -    yes
13B                                       llama2   llama-2-13b                               llama-2-13b                               2  -    yes
70B                                       llama2   llama-2-70b                               llama-2-70b                               8  -    yes
7B-chat                                   llama2   llama-2-7b-chat                           llama-2-7b-chat                           1  -    yes
13B-chat                                  llama2   llama-2-13b-chat                          llama-2-13b-chat                          2  -    yes
70B-chat                                  llama2   llama-2-70b-chat                          llama-2-70b-chat                          8  -    yes
8B                                        llama3   8b_pre_trained                            Meta-Llama-3-8B                           1  -    yes
8B-instruct                               llama3   8b_instruction_tuned                      Meta-Llama-3-8B-Instruct                  1  -    yes
70B                                       llama3   70b_pre_trained                           Meta-Llama-3-70B                          8  -    yes
70B-instruct                              llama3   70b_instruction_tuned                     Meta-Llama-3-70B-Instruct                 8  -    yes
Meta-Llama-3-8B                           llama3   8b_pre_trained                            Meta-Llama-3-8B                           1  -    no
Meta-Llama-3-8B-Instruct                  llama3   8b_instruction_tuned                      Meta-Llama-3-8B-Instruct                  1  -    no
Meta-Llama-3-70B                          llama3   70b_pre_trained                           Meta-Llama-3-70B                          8  -    no
Meta-Llama-3-70B-Instruct                 llama3   70b_instruction_tuned                     Meta-Llama-3-70B-Instruct                 8  -    no
Llama3.1-8B                               llama3x  Llama-3.1-8B                              Llama3.1-8B                               1  -    yes
Llama3.1-8B-Instruct                      llama3x  Llama-3.1-8B-Instruct                     Llama3.1-8B-Instruct                      1  -    yes
Llama3.1-70B                              llama3x  Llama-3.1-70B                             Llama3.1-70B                              8  -    yes
Llama3.1-70B-Instruct                     llama3x  Llama-3.1-70B-Instruct                    Llama3.1-70B-Instruct                     8  -    yes
Llama3.1-405B                             llama3x  Llama-3.1-405B                            Llama3.1-405B                             8  fp8  yes
Llama3.1-405B:bf16-mp8                    llama3x  Llama-3.1-405B-MP8                        Llama3.1-405B-bf16-mp8                    8  -    yes
Llama3.1-405B:bf16-mp16                   llama3x  Llama-3.1-405B-MP16                       Llama3.1-405B-bf16-mp16                   16 -    yes
Llama3.1-405B-Instruct                    llama3x  Llama-3.1-405B-Instruct                   Llama3.1-405B-Instruct                    8  fp8  yes
Llama3.1-405B-Instruct:bf16-mp8           llama3x  Llama-3.1-405B-Instruct-MP8               Llama3.1-405B-Instruct-bf16-mp8           8  -    yes
Llama3.1-405B-Instruct:bf16-mp16          llama3x  Llama-3.1-405B-Instruct-MP16              Llama3.1-405B-Instruct-bf16-mp16          16 -    yes
Llama3.2-1B                               llama3x  Llama-3.2-1B                              Llama3.2-1B                               1  -    yes
Llama3.2-1B-Instruct                      llama3x  Llama-3.2-1B-Instruct                     Llama3.2-1B-Instruct                      1  -    yes
Llama3.2-3B                               llama3x  Llama-3.2-3B                              Llama3.2-3B                               1  -    yes
Llama3.2-3B-Instruct                      llama3x  Llama-3.2-3B-Instruct                     Llama3.2-3B-Instruct                      1  -    yes
Llama3.2-1B-Instruct:int4-qlora-eo8       llama3x  Llama-3.2-1B-Instruct-QLORA_INT4_EO8      Llama3.2-1B-Instruct-int4-qlora-eo8       1  -    yes
Llama3.2-1B-Instruct:int4-spinquant-eo8   llama3x  Llama-3.2-1B-Instruct-SpinQuant_INT4_EO8  Llama3.2-1B-Instruct-int4-spinquant-eo8   1  -    yes
Llama3.2-3B-Instruct:int4-qlora-eo8       llama3x  Llama-3.2-3B-Instruct-QLORA_INT4_EO8      Llama3.2-3B-Instruct-int4-qlora-eo8       1  -    yes
Llama3.2-3B-Instruct:int4-spinquant-eo8   llama3x  Llama-3.2-3B-Instruct-SpinQuant_INT4_EO8  Llama3.2-3B-Instruct-int4-spinquant-eo8   1  -    yes
Llama3.3-70B-Instruct                     llama3x  Llama-3.3-70B-Instruct                    Llama3.3-70B-Instruct                     8  -    yes
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
        llama3) printf 'Llama 3' ;;
        llama3x) printf 'Llama 3.1/3.2/3.3' ;;
    esac
}

# Comma-separated list of the model names of one family shown at the prompt.
models_of_family() {
    local want="$1" name fam remote dest shards extra listed out=""
    while read -r name fam remote dest shards extra listed; do
        [[ -z "$name" || "$fam" != "$want" || "$listed" != yes ]] && continue
        out="${out:+$out,}$name"
    done <<< "$MODEL_TABLE"
    printf '%s' "$out"
}

# Space-separated families that have a model called NAME (case-insensitive).
families_of() {
    local want name fam remote dest shards extra listed out=""
    want="$(lower "$1")"
    while read -r name fam remote dest shards extra listed; do
        [[ -z "$name" ]] && continue
        [[ "$(lower "$name")" == "$want" ]] && out="${out:+$out }$fam"
    done <<< "$MODEL_TABLE"
    printf '%s' "$out"
}

# Print the table row "name family remote local shards extra" of model NAME in
# FAMILY (case-insensitive), or return 1 when that family has no such model.
lookup_model() {
    local want="$(lower "$1")" family="$2" name fam remote dest shards extra listed
    while read -r name fam remote dest shards extra listed; do
        [[ -z "$name" || "$fam" != "$family" ]] && continue
        if [[ "$(lower "$name")" == "$want" ]]; then
            printf "%s %s %s %s %s %s\n" "$name" "$fam" "$remote" "$dest" "$shards" "$extra"
            return 0
        fi
    done <<< "$MODEL_TABLE"
    return 1
}

valid_names_message() {
    printf 'Valid model names:\n'
    printf '  Llama 2:   %s\n' "$(models_of_family llama2 | sed 's/,/, /g')"
    printf '  Llama 3:   %s\n' "$(models_of_family llama3 | sed 's/,/, /g')"
    printf '  Llama 3.1/3.2/3.3: %s\n' "$(models_of_family llama3x | sed 's/,/, /g')"
}

normalize_family() {
    case "$(lower "$1")" in
        llama2 | llama-2 | 2) printf 'llama2' ;;
        llama3 | llama-3 | 3) printf 'llama3' ;;
        llama3.[123] | llama-3.[123] | 3.[123] | llama3.x | 3.x) printf 'llama3x' ;;
        *) return 1 ;;
    esac
}

usage() {
    sed -n '3,26p' "$0" | sed 's/^# \{0,1\}//'
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
        || die "unknown model family '$FAMILY_ARG'; use llama2, llama3, llama3.1, llama3.2 or llama3.3"
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
    case "$FAMILY" in
        llama2 | llama3)
            prompt="Enter the list of models to download without spaces ($(models_of_family "$FAMILY")), or press Enter for all: " ;;
        llama3x)
            prompt="Enter the list of models to download without spaces ($(models_of_family llama3x)): " ;;
        *)
            {
                printf 'Available models:\n'
                printf '  Llama 2:   %s\n' "$(models_of_family llama2)"
                printf '  Llama 3:   %s (with --family llama3)\n' "$(models_of_family llama3)"
                printf '  Llama 3.1/3.2/3.3: %s\n' "$(models_of_family llama3x)"
            } >&2
            prompt="Enter the list of models to download without spaces (e.g. 7B,13B or Llama3.2-1B), or press Enter for all Llama 2 models: " ;;
    esac
    REQUESTED="$(ask "$prompt")"
    [[ -t 0 ]] || printf '\n' >&2
fi
REQUESTED="$(trim "$REQUESTED")"
REQ_LIST=()
IFS=',' read -r -a REQ_LIST <<< "$REQUESTED" || true

# The family: --family, else the first name that only one family has (70B is
# both Llama 2's and Llama 3's), else Llama 2 as in Meta's first script.
if [[ -z "$FAMILY" ]]; then
    for raw in "${REQ_LIST[@]+"${REQ_LIST[@]}"}"; do
        fams="$(families_of "$(trim "$raw")")"
        if [[ -n "$fams" && "$fams" != *" "* ]]; then
            FAMILY="$fams"
            break
        fi
    done
    FAMILY="${FAMILY:-llama2}"
fi

if [[ -z "$REQUESTED" ]]; then
    # Enter: what it means in Meta's script for this family.
    [[ "$FAMILY" != llama3x ]] || die "Meta's downloader for Llama 3.1, 3.2 and 3.3 has no 'all': name the models, e.g. Llama3.1-8B-Instruct,Llama3.2-1B ($(models_of_family llama3x))"
    REQUESTED="$(models_of_family "$FAMILY")"
    IFS=',' read -r -a REQ_LIST <<< "$REQUESTED" || true
fi

# Resolve every name before anything is downloaded.
SEL_NAMES=()
SEL_REMOTE=()
SEL_LOCAL=()
SEL_SHARDS=()
SEL_EXTRA=()
SEEN=","
BAD=""
for raw in "${REQ_LIST[@]+"${REQ_LIST[@]}"}"; do
    m="$(trim "$raw")"
    [[ -z "$m" ]] && continue
    if ! row="$(lookup_model "$m" "$FAMILY")"; then
        fams="$(families_of "$m")"
        if [[ -n "$fams" ]]; then
            other="${fams%% *}"
            die "'$m' is a $(family_label "$other") model but the download is for $(family_label "$FAMILY") models; one URL serves one family, so download the families separately (--family tells which one a name like 70B means)"
        fi
        BAD="${BAD:+$BAD, }$m"
        continue
    fi
    read -r name fam remote dest shards extra <<< "$row"
    case "$SEEN" in *",$dest,"*) continue ;; esac
    SEEN="$SEEN$dest,"
    SEL_NAMES+=("$name")
    SEL_REMOTE+=("$remote")
    SEL_LOCAL+=("$dest")
    SEL_SHARDS+=("$shards")
    SEL_EXTRA+=("$extra")
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

# fetch MODE REMOTE [LOCAL]: download bucket file REMOTE (the text that
# replaces '*' in the signed URL) to $TARGET/LOCAL (default: REMOTE).
# MODE "resume" continues a partial file; "fresh" always re-downloads.
fetch() {
    local mode="$1" rel="$2" url out rc=0
    url="${URL_PREFIX}${rel}${URL_SUFFIX}"
    out="$TARGET/${3:-$rel}"
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

case "$FAMILY" in
    llama2 | llama3)
        echo "Downloading LICENSE and Acceptable Usage Policy"
        fetch fresh LICENSE
        # Llama 2's policy is USE_POLICY.md, Llama 3's USE_POLICY; llama-models
        # fetches neither for Llama 3.1/3.2/3.3.
        if [[ "$FAMILY" == llama2 ]]; then fetch fresh USE_POLICY.md; else fetch fresh USE_POLICY; fi
        ;;
esac

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
    remote="${SEL_REMOTE[$i]}"
    local_dir="${SEL_LOCAL[$i]}"
    shards="${SEL_SHARDS[$i]}"
    echo "Downloading $name"
    mkdir -p "$TARGET/$local_dir"
    s=0
    while [[ $s -lt $shards ]]; do
        echo "Downloading shard $((s + 1)) of $shards for $name"
        shard="$(printf 'consolidated.%02d.pth' "$s")"
        fetch resume "$remote/$shard" "$local_dir/$shard"
        if [[ "${SEL_EXTRA[$i]}" == fp8 ]]; then
            fetch resume "$remote/fp8_scales_$s.pt" "$local_dir/fp8_scales_$s.pt"
        fi
        s=$((s + 1))
    done
    fetch fresh "$remote/params.json" "$local_dir/params.json"
    if [[ "$FAMILY" != llama2 ]]; then
        # Llama 3 and 3.x models each carry their own tokenizer.
        echo "Downloading tokenizer for $name"
        fetch resume "$remote/tokenizer.model" "$local_dir/tokenizer.model"
    fi
    fetch fresh "$remote/checklist.chk" "$local_dir/checklist.chk"
    echo "Checking checksums"
    verify "$local_dir" checklist.chk
done

echo "Done: ${SEL_NAMES[*]} downloaded to $TARGET"
