// Legacy map definitions: struct bpf_map_def in SEC("maps") (libbpf < 1.0, iproute2, bcc-era).
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct bpf_map_def {
	unsigned int type;
	unsigned int key_size;
	unsigned int value_size;
	unsigned int max_entries;
	unsigned int map_flags;
};

struct bpf_map_def SEC("maps") legacy_hash = {
	.type = BPF_MAP_TYPE_HASH,
	.key_size = 4,
	.value_size = 8,
	.max_entries = 64,
};

struct bpf_map_def SEC("maps") legacy_array = {
	.type = BPF_MAP_TYPE_ARRAY,
	.key_size = 4,
	.value_size = 16,
	.max_entries = 4,
	.map_flags = 0,
};

SEC("kprobe/do_nanosleep")
int count(void *ctx)
{
	int k = 1;
	long *v = bpf_map_lookup_elem(&legacy_hash, &k);
	if (v)
		__sync_fetch_and_add(v, 1);
	bpf_map_lookup_elem(&legacy_array, &k);
	return 0;
}

char _license[] SEC("license") = "GPL";
unsigned int _version SEC("version") = 0x050a00;
