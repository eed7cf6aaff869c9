"""A fixed, embedded probe batch for `moefy verify`: prose, code and structured text, so the check touches
varied routing without any download. It is a smoke probe, not a benchmark."""

PROBE_TEXTS = (
    "The river rose slowly through the night, and by morning the lower fields had turned into a shallow lake. "
    "Farmers gathered on the bridge to watch the water, talking quietly about the harvest they would lose and "
    "the repairs that would have to wait until spring. Nobody in the village could remember a flood this early "
    "in the year, although the oldest residents said their parents had told stories of one.",
    "def merge_sorted(left, right):\n"
    "    \"\"\"Merge two sorted lists into one sorted list.\"\"\"\n"
    "    result = []\n"
    "    i = j = 0\n"
    "    while i < len(left) and j < len(right):\n"
    "        if left[i] <= right[j]:\n"
    "            result.append(left[i])\n"
    "            i += 1\n"
    "        else:\n"
    "            result.append(right[j])\n"
    "            j += 1\n"
    "    result.extend(left[i:])\n"
    "    result.extend(right[j:])\n"
    "    return result\n",
    "Photosynthesis converts light energy into chemical energy. In the light-dependent reactions, water is split "
    "and oxygen is released; in the Calvin cycle, carbon dioxide is fixed into sugars using ATP and NADPH. "
    "The overall equation is 6 CO2 + 6 H2O -> C6H12O6 + 6 O2.",
    "Meeting notes, 14 March: 1. Budget review postponed to next week. 2. The new office opens on the first of "
    "May. 3. Everyone should submit travel requests at least ten days in advance. Action items: Maria drafts the "
    "announcement; Tom checks the lease.",
)
