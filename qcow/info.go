package qcow

import "fmt"

// Info describes an image, in the spirit of `qemu-img info`.
type Info struct {
	Filename        string        `json:"filename"`
	Format          Format        `json:"format"`
	Version         int           `json:"version,omitempty"`
	VirtualSize     int64         `json:"virtual-size"`
	FileSize        int64         `json:"actual-size"`
	ClusterSize     int64         `json:"cluster-size,omitempty"`
	RefcountBits    int           `json:"refcount-bits,omitempty"`
	CompressionType string        `json:"compression-type,omitempty"`
	ExtendedL2      bool          `json:"extended-l2,omitempty"`
	LazyRefcounts   bool          `json:"lazy-refcounts,omitempty"`
	Dirty           bool          `json:"dirty-flag,omitempty"`
	Corrupt         bool          `json:"corrupt,omitempty"`
	Incompatible    uint64        `json:"incompatible-features,omitempty"`
	Compatible      uint64        `json:"compatible-features,omitempty"`
	Autoclear       uint64        `json:"autoclear-features,omitempty"`
	Features        []string      `json:"features,omitempty"`
	BackingFile     string        `json:"backing-filename,omitempty"`
	BackingFormat   string        `json:"backing-filename-format,omitempty"`
	DataFile        string        `json:"data-file,omitempty"`
	Snapshots       []Snapshot    `json:"snapshots,omitempty"`
	Extensions      []Extension   `json:"unknown-extensions,omitempty"`
	FeatureNames    []FeatureName `json:"feature-names,omitempty"`
	Backing         *Info         `json:"backing-image,omitempty"`
}

// Info returns a description of the image and of its backing chain.
func (im *Image) Info() (*Info, error) {
	in := &Info{
		Filename:    im.name,
		Format:      im.format,
		VirtualSize: im.Size(),
		FileSize:    im.fileSize,
		ClusterSize: im.clusterSize,
	}
	if h := im.h; h != nil {
		in.Version = int(h.version)
		in.BackingFile = h.backingFile
		in.BackingFormat = h.backingFormat
		if im.format == FormatQCOW2 {
			in.RefcountBits = 1 << h.refcountOrder
			in.CompressionType = "zlib"
			if h.compressionType == CompressionZstd {
				in.CompressionType = "zstd"
			}
			in.ExtendedL2 = im.extL2
			in.LazyRefcounts = h.compat&CompatLazyRefcounts != 0
			in.Dirty = h.incompat&IncompatDirty != 0
			in.Corrupt = h.incompat&IncompatCorrupt != 0
			in.Incompatible, in.Compatible, in.Autoclear = h.incompat, h.compat, h.autoclear
			in.DataFile = h.dataFile
			in.Extensions = h.unknownExts
			in.FeatureNames = h.features
			in.Features = featureList(h)
			snaps, err := im.Snapshots()
			if err != nil {
				return nil, err
			}
			in.Snapshots = snaps
		}
	}
	if im.backing != nil {
		b, err := im.backing.Info()
		if err != nil {
			return nil, err
		}
		in.Backing = b
	}
	return in, nil
}

func featureList(h *header) []string {
	var out []string
	names := map[[2]int]string{
		{0, 0}: "dirty", {0, 1}: "corrupt", {0, 2}: "external data file",
		{0, 3}: "compression type", {0, 4}: "extended L2 entries",
		{1, 0}: "lazy refcounts", {2, 0}: "bitmaps", {2, 1}: "raw external data",
	}
	for _, f := range h.features {
		names[[2]int{f.Type, f.Bit}] = f.Name
	}
	for t, v := range []uint64{h.incompat, h.compat, h.autoclear} {
		for b := 0; b < 64; b++ {
			if v&(1<<b) == 0 {
				continue
			}
			n, ok := names[[2]int{t, b}]
			if !ok {
				n = fmt.Sprintf("%s bit %d", [...]string{"incompatible", "compatible", "autoclear"}[t], b)
			}
			out = append(out, n)
		}
	}
	return out
}
