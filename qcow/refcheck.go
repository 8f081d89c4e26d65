package qcow

import "errors"

// check is implemented in this file (placeholder until the checker lands).
func (im *Image) check() (*CheckResult, error) {
	return nil, errors.New("qcow: check not implemented yet")
}
