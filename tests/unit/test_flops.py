"""The peak FLOP/s that MFU is computed against: one per host, the best its cores have given to any run."""
from hvdtrain import flops


def test_a_hosts_peak_is_the_sum_of_its_ranks_probes_or_the_better_one_kept():
    probes = [("a", 100e9), ("a", 120e9), ("b", 90e9)]
    assert flops.host_peaks(probes, {}) == {"a": 220e9, "b": 90e9}
    # a better peak kept from an earlier run (another split of the same cores) wins; a worse one does not
    assert flops.host_peaks(probes, {"a": 250e9, "b": 10e9}) == {"a": 250e9, "b": 90e9}


def test_the_kept_peak_only_rises(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    key = flops.host_key()
    assert flops.kept_peak(key) is None
    flops.keep_peak(key, 200e9)
    flops.keep_peak(key, 150e9)  # a probe taken under load does not lower the host's peak
    assert flops.kept_peak(key) == 200e9
    flops.keep_peak(key, 220e9)
    assert flops.kept_peak(key) == 220e9
    (tmp_path / "hvdtrain" / "peak-flops.json").write_text("not json")  # a corrupt file is started over
    flops.keep_peak(key, 100e9)
    assert flops.kept_peak(key) == 100e9
