// An analytics hook in Tyk's style: masks passwords in the recorded response body and
// tags the record. The client's response is untouched; only the record changes.
package main

import (
	"encoding/base64"
	"regexp"

	"gatehouse.dev/go/analytics"
)

var password = regexp.MustCompile(`"password":\s*"[^"]*"`)

func MaskAnalyticsData(record *analytics.AnalyticsRecord) {
	data, err := base64.StdEncoding.DecodeString(record.RawResponse)
	if err != nil {
		return
	}
	masked := password.ReplaceAll(data, []byte(`"password":"****"`))
	record.RawResponse = base64.StdEncoding.EncodeToString(masked)
	record.Tags = append(record.Tags, "masked-by-go")
}

func main() {}
